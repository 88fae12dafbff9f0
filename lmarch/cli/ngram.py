"""``lmarch ngram train|sample|eval``: the n-gram language model (:mod:`lmarch.tasks.ngram`)."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``ngram`` and its subcommands to the ``lmarch`` parser."""
    from lmarch.classic.ngram import SMOOTHINGS, UNITS

    g = sub.add_parser("ngram", help="n-gram language model: Kneser-Ney, modified KN, add-k")
    gsub = g.add_subparsers(dest="ngram_command", required=True, parser_class=type(g))
    t = gsub.add_parser(
        "train", help="count n-grams of a corpus's train split, score its val split"
    )
    t.add_argument("--data", default="shakespeare", help="'shakespeare', a .txt, folder or .jsonl")
    t.add_argument("--order", type=int, default=5, help="n: tokens of context + 1 (default: 5)")
    t.add_argument("--smoothing", choices=SMOOTHINGS, default="mkn", help="default: mkn")
    t.add_argument("--k", type=float, default=1.0, help="add-k's k (default: 1, Laplace)")
    t.add_argument(
        "--discount", type=float, default=None, help="a fixed KN discount (default: estimated)"
    )
    t.add_argument("--unit", choices=UNITS, default="word", help="tokens (default: word)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="as 'lmarch train' (0.1)")
    t.add_argument("--out", required=True, help="folder for the model")
    s = gsub.add_parser("sample", help="draw text from a trained n-gram model")
    s.add_argument("model_dir", help="a folder written by 'lmarch ngram train'")
    s.add_argument("--tokens", type=int, default=200, help="tokens to draw (default: 200)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--prompt", default="", help="text to continue")
    e = gsub.add_parser("eval", help="perplexity, nats/token and bits/char on a val split")
    e.add_argument("model_dir", help="a folder written by 'lmarch ngram train'")
    e.add_argument("--data", default=None, help="corpus (default: the one it was trained on)")
    for q in (t, s, e):
        q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_ngram(args: argparse.Namespace) -> int:
    """Run ``lmarch ngram train|sample|eval``."""
    from rich.console import Console

    from lmarch.classic.ngram import NgramConfig
    from lmarch.tasks import ngram

    console = Console(stderr=True, soft_wrap=True)
    if args.ngram_command == "sample":
        text = ngram.sample_ngram(args.model_dir, args.tokens, seed=args.seed, prompt=args.prompt)
        print(args.prompt + text)
        if args.json:
            print(json.dumps({"prompt": args.prompt, "text": text, "seed": args.seed}))
        return 0
    if args.ngram_command == "eval":
        scores = ngram.eval_ngram(args.model_dir, args.data)
        console.print(
            f"{args.model_dir} on {scores['data']}: {ngram.describe(scores)}", markup=False
        )
        if args.json:
            print(json.dumps(scores))
        return 0
    config = NgramConfig(
        order=args.order, smoothing=args.smoothing, k=args.k, discount=args.discount,
        unit=args.unit,
    )  # fmt: skip
    with console.status(f"counting {args.order}-grams of {args.data}"):
        summary = ngram.train_ngram(
            args.data, args.out, config, args.val_fraction, log=lambda m: console.print(m)
        )
    val = ngram.describe(summary["val"]) if summary["val"] else "no validation text"
    console.print(f"{args.order}-gram {args.smoothing} ({args.unit}): {val} -> {args.out}")
    if args.json:
        print(json.dumps(summary))
    return 0


COMMANDS = {"ngram": cmd_ngram}
