"""``lmarch word2vec train|neighbors|analogy|eval`` (:mod:`lmarch.tasks.word2vec`)."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``word2vec`` and its subcommands to the ``lmarch`` parser."""
    w = sub.add_parser("word2vec", help="word2vec (skip-gram / CBOW, negative sampling)")
    wsub = w.add_subparsers(dest="word2vec_command", required=True, parser_class=type(w))
    t = wsub.add_parser("train", help="train word vectors on a corpus and save them")
    t.add_argument("--data", default="shakespeare", help="'shakespeare', a .txt, folder or .jsonl")
    t.add_argument("--out", required=True, help="folder for the vectors")
    kind = t.add_mutually_exclusive_group()
    kind.add_argument("--sg", dest="sg", action="store_true", default=True, help="skip-gram")
    kind.add_argument("--cbow", dest="sg", action="store_false", help="CBOW (mean of context)")
    t.add_argument("--dim", type=int, default=100, help="vector size (default: 100)")
    t.add_argument("--window", type=int, default=5, help="max context distance (default: 5)")
    t.add_argument("--negative", type=int, default=5, help="negatives per pair (default: 5)")
    t.add_argument("--epochs", type=int, default=5, help="passes over the corpus (default: 5)")
    t.add_argument("--min-count", type=int, default=5, help="drop rarer words (default: 5)")
    t.add_argument("--sample", type=float, default=1e-3, help="subsampling (default: 1e-3)")
    t.add_argument("--alpha", type=float, default=0.025, help="initial learning rate (0.025)")
    t.add_argument(
        "--shared-negatives",
        type=int,
        default=0,
        help="N > 0: draw N negatives per update, shared by its pairs (faster; default 0)",
    )
    t.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    t.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    n = wsub.add_parser("neighbors", help="the nearest words by cosine similarity")
    n.add_argument("model_dir", help="a folder written by 'lmarch word2vec train'")
    n.add_argument("word")
    n.add_argument("-k", type=int, default=10, help="how many (default: 10)")
    a = wsub.add_parser("analogy", help="a is to b as c is to ? (3CosAdd: b - a + c)")
    a.add_argument("model_dir", help="a folder written by 'lmarch word2vec train'")
    a.add_argument("a")
    a.add_argument("b")
    a.add_argument("c")
    a.add_argument("-k", type=int, default=5, help="how many answers (default: 5)")
    e = wsub.add_parser("eval", help="analogies, WordSim-353 and SimLex-999 (gensim's files)")
    e.add_argument("model_dir", help="a folder written by 'lmarch word2vec train'")
    e.add_argument(
        "--peer", action="store_true", help="also train gensim's Word2Vec the same way and score it"
    )
    e.add_argument("--workers", type=int, default=2, help="gensim's worker threads (default: 2)")
    for q in (t, n, a, e):
        q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _print_words(pairs: list[tuple[str, float]]) -> None:
    for word, score in pairs:
        print(f"{word}\t{score:.4f}")


def cmd_word2vec(args: argparse.Namespace) -> int:
    """Run ``lmarch word2vec train|neighbors|analogy|eval``."""
    from rich.console import Console

    from lmarch.tasks import word2vec as task

    console = Console(stderr=True)
    command = args.word2vec_command
    if command == "neighbors":
        vectors, _ = task.load_word2vec(args.model_dir)
        found = vectors.neighbors(args.word, k=args.k)
        _print_words(found)
        if args.json:
            print(json.dumps({"word": args.word, "neighbors": found}))
        return 0
    if command == "analogy":
        vectors, _ = task.load_word2vec(args.model_dir)
        found = vectors.analogy(args.a, args.b, args.c, k=args.k)
        _print_words(found)
        if args.json:
            print(json.dumps({"query": [args.a, args.b, args.c], "answers": found}))
        return 0
    if command == "eval":
        if args.peer:
            with console.status("training gensim's Word2Vec with the same settings"):
                result = task.eval_word2vec(args.model_dir, peer=True, workers=args.workers)
        else:
            result = task.eval_word2vec(args.model_dir)
        for name in ("lmarch", "gensim"):
            if name in result:
                print(f"{name}: {task.describe(result[name])}")
        if args.json:
            print(json.dumps(result))
        return 0
    return _train(args, console)


def _train(args: argparse.Namespace, console) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from lmarch.classic.word2vec import Word2VecConfig
    from lmarch.tasks import word2vec as task

    config = Word2VecConfig(
        sg=args.sg, vector_size=args.dim, window=args.window, negative=args.negative,
        sample=args.sample, min_count=args.min_count, epochs=args.epochs, alpha=args.alpha,
        seed=args.seed, shared_negatives=args.shared_negatives,
    )  # fmt: skip
    config.validate()
    if args.threads < 1:
        from lmarch.errors import LmarchError

        raise LmarchError(f"--threads must be at least 1, got {args.threads}")
    columns = (TextColumn("word2vec"), BarColumn(), TextColumn("{task.completed:,} words"))
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        job = bar.add_task("train", total=None)
        meta = task.train_word2vec_run(
            args.data,
            args.out,
            config,
            threads=args.threads,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    model = "skip-gram" if config.sg else "CBOW"
    console.print(
        f"{model} {config.vector_size}d on {args.data}: {meta['vocabulary']:,} words in the "
        f"vocabulary, {meta['words']:,} words trained at {meta['words_per_s']:,.0f}/s -> {args.out}",
        markup=False,
    )
    if args.json:
        print(json.dumps(meta))
    return 0


COMMANDS = {"word2vec": cmd_word2vec}
