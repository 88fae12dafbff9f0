"""``lmarch tfidf FILES...|shakespeare``: top terms and nearest documents (:mod:`lmarch.tasks.tfidf`)."""

from __future__ import annotations

import argparse
import json


def _df(text: str) -> int | float:
    """A document-frequency bound: a whole number of documents, or a fraction like 0.5."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``tfidf`` to the ``lmarch`` parser."""
    p = sub.add_parser("tfidf", help="TF-IDF: each document's top terms and nearest documents")
    p.add_argument("sources", nargs="+", help="text files or folders, or 'shakespeare' (38 plays)")
    p.add_argument("--top", type=int, default=10, help="terms to list per document (default: 10)")
    p.add_argument("--nearest", type=int, default=3, help="nearest documents to list (default: 3)")
    p.add_argument(
        "--ngram-range", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"),
        help="word n-gram lengths (default: 1 1)",
    )  # fmt: skip
    p.add_argument("--sublinear", action="store_true", help="tf = 1 + ln(count)")
    p.add_argument("--min-df", type=_df, default=1, help="drop rarer terms (count or fraction)")
    p.add_argument("--max-df", type=_df, default=1.0, help="drop commoner terms (default: 1.0)")
    p.add_argument("--norm", choices=["l2", "l1", "none"], default="l2", help="row norm (l2)")
    p.add_argument("--no-smooth-idf", action="store_true", help="idf = ln(N / df) + 1")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_tfidf(args: argparse.Namespace) -> int:
    """Run ``lmarch tfidf``."""
    from rich.console import Console

    from lmarch.classic.tfidf import TfidfConfig
    from lmarch.tasks.tfidf import tfidf_report

    config = TfidfConfig(
        ngram_range=tuple(args.ngram_range), min_df=args.min_df, max_df=args.max_df,
        sublinear_tf=args.sublinear, smooth_idf=not args.no_smooth_idf,
        norm=None if args.norm == "none" else args.norm,
    )  # fmt: skip
    report = tfidf_report(args.sources, config, top=args.top, nearest=args.nearest)
    console = Console(stderr=args.json, highlight=False, soft_wrap=True)
    for row in report["documents"]:
        console.print(row["name"], style="bold", markup=False)
        console.print("  " + ", ".join(f"{t} {w:.3f}" for t, w in row["top_terms"]), markup=False)
        if row["nearest"]:
            near = ", ".join(f"{name} {cos:.3f}" for name, cos in row["nearest"])
            console.print(f"  nearest: {near}", markup=False)
    console.print(f"{len(report['documents'])} documents, {report['terms']:,} terms", markup=False)
    if args.json:
        print(json.dumps(report))
    return 0


COMMANDS = {"tfidf": cmd_tfidf}
