"""``lmarch glove train|neighbors``: GloVe vectors (:mod:`lmarch.tasks.glove`)."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``glove train`` and ``glove neighbors`` to the ``lmarch`` parser."""
    from lmarch.classic.glove import GloveConfig
    from lmarch.cli.options import add_config_options

    g = sub.add_parser("glove", help="GloVe word vectors: train on a corpus, nearest words")
    gsub = g.add_subparsers(dest="glove_command", required=True, parser_class=type(g))
    t = gsub.add_parser("train", help="count co-occurrences and fit GloVe vectors (AdaGrad)")
    t.add_argument(
        "--data", default="shakespeare", help="'shakespeare', 'tinyshakespeare', a .txt, folder "
        "or .jsonl (default: shakespeare, the 38 bundled plays)",
    )  # fmt: skip
    t.add_argument(
        "--out", required=True, help="folder for vectors.txt (GloVe format) + glove.json"
    )
    t.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    t.set_defaults(
        glove_keys=add_config_options(t.add_argument_group("GloVe (GloveConfig)"), GloveConfig)
    )
    n = gsub.add_parser("neighbors", help="the nearest words to a word, by cosine")
    n.add_argument(
        "vectors", help="a glove or word2vec run folder, or a word2vec text/binary or GloVe file"
    )
    n.add_argument("word", help="the word to look up")
    n.add_argument("-k", type=int, default=10, help="how many neighbours (default: 10)")
    n.add_argument(
        "--unicode-errors", choices=["strict", "replace", "ignore"], default="strict",
        help="words that are not valid UTF-8: refuse (default), or replace/drop the bad bytes",
    )  # fmt: skip
    for p in (t, n):
        p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def cmd_glove(args: argparse.Namespace) -> int:
    """Run ``lmarch glove train`` or ``lmarch glove neighbors``."""
    from rich.console import Console

    from lmarch.tasks import glove

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.glove_command == "neighbors":
        vectors = glove.load_vectors(args.vectors, errors=args.unicode_errors)
        result = glove.nearest_words(vectors, args.word, args.k)
        out = Console(stderr=args.json, highlight=False, soft_wrap=True)
        for rank, hit in enumerate(result["neighbors"], start=1):
            out.print(f"{rank:>3}. {hit['word']}  {hit['cosine']:.4f}", markup=False)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        return 0

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from lmarch.classic.glove import GloveConfig
    from lmarch.cli.options import given_values
    from lmarch.errors import LmarchError

    if args.threads < 1:
        raise LmarchError(f"--threads must be at least 1, got {args.threads}")
    config = GloveConfig(**given_values(args, args.glove_keys))
    bar = Progress(
        TextColumn("[bold]glove"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
        TextColumn("J {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
    task = bar.add_task("glove", total=config.epochs, loss="-", start=False)

    def progress(epoch: int, loss: float) -> None:
        if epoch == 0:  # the corpus is read and counted: nothing left to refuse
            bar.start()
            bar.start_task(task)
        bar.update(task, completed=epoch, loss=f"{loss:,.0f}")

    try:
        summary = glove.train_glove_run(args.data, args.out, config, progress, args.threads)
    finally:
        bar.stop()
    console.print(
        f"{summary['vocab_size']:,} words, {summary['tokens']:,} tokens, "
        f"{summary['nonzeros']:,} co-occurring pairs; J {summary['loss_start']:,.0f} -> "
        f"{summary['loss_end']:,.0f} in {summary['seconds']:.1f} s; vectors in "
        f"{summary['vectors_file']}",
        markup=False,
    )
    if args.json:
        print(json.dumps(summary))
    return 0


COMMANDS = {"glove": cmd_glove}
