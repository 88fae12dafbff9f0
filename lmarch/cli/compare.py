"""``lmarch compare``: the architecture table, measured (:mod:`lmarch.analysis.compare`)."""

from __future__ import annotations

import argparse
import json

from lmarch.errors import LmarchError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``compare`` subcommand."""
    from lmarch.analysis.compare import DEFAULT_MODELS, MODELS

    c = sub.add_parser(
        "compare", help="train n-gram, RNN, LSTM, GRU, GPT, LLaMA on the same text and budget"
    )
    c.add_argument("--data", default="shakespeare", help="corpus (shakespeare, a file, a folder)")
    c.add_argument("--budget-seconds", type=float, default=60.0, help="training time per model")
    c.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from {', '.join(MODELS)}",
    )
    c.add_argument("--match-params", type=int, default=None, help="resize each to ~N parameters")
    c.add_argument("--ngram-order", type=int, default=5, help="order of the n-gram model")
    c.add_argument("--val-chars", type=int, default=None, help="score the first N held-out chars")
    c.add_argument("--max-steps", type=int, default=None, help="cap each model's steps")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    c.add_argument("--out", default="runs/compare", help="folder for compare.png and rows.json")
    c.add_argument("--json", action="store_true", help="print {'rows': [...]} as the last line")


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison, print the table and the verdict, write the plot."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from lmarch.analysis.compare import (
        CompareConfig,
        compare_models,
        ordering_verdict,
        plot_curves,
    )
    from lmarch.weights.checkpoint import write_json

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    cfg = CompareConfig(
        data=args.data,
        budget_seconds=args.budget_seconds,
        models=models,
        match_params=args.match_params,
        ngram_order=args.ngram_order,
        val_chars=args.val_chars,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
    )
    console = Console(stderr=args.json)
    rows = compare_models(cfg, log=lambda line: console.print(line, markup=False))
    table = Table(title=f"{args.data}: {args.budget_seconds:g} s of training per model")
    for col in ("model", "type", "params", "tokens/s", "steps", "val nats/char", "bits/char"):
        table.add_column(col, justify="left" if col in ("model", "type") else "right")
    for r in rows:
        table.add_row(
            r.model, r.kind, f"{r.params:,}", f"{r.tokens_per_s:,.0f}", str(r.steps),
            f"{r.val_loss:.4f}", f"{r.bits_per_char:.3f}",
        )  # fmt: skip
    console.print(table)
    for r in rows:
        console.print(f"{r.model}: {r.sample[:120]!r}", markup=False, highlight=False)
    verdict = ordering_verdict(rows)
    console.print(verdict, markup=False)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmarchError(f"cannot write to {out}: {exc.strerror}") from None
    plot = plot_curves(rows, out / "compare.png", f"{args.data}, {args.budget_seconds:g} s each")
    summary = {"rows": [r.as_dict() for r in rows], "verdict": verdict, "plot": str(plot)}
    write_json(out / "rows.json", summary)
    console.print(f"plot: {plot}", markup=False)
    if args.json:
        print(json.dumps(summary))
    return 0


COMMANDS = {"compare": cmd_compare}
