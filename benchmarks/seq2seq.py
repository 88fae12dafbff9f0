"""The original Transformer, T5 and BART on the two bundled seq2seq tasks, same training budget.

For each model preset (``transformer-tiny``, ``t5-tiny``, ``bart-tiny``: 2+2 layers, 128 wide,
a vocabulary of up to 2000 tokens each trains on the task's text, so their parameter counts are
close) and each bundled task of :mod:`lmarch.data.shakespeare_tasks` (``shakespeare-piglatin``,
standing in for translation, and ``shakespeare-speakers``, for summarisation), this trains the
preset from scratch with ``lmarch translate train`` (:func:`lmarch.tasks.seq2seq.train_seq2seq`:
the seq2seq objective of ``lmarch train``, each preset's own recipe for learning rate and
schedule, the same ``--iters`` steps of ``--batch-size`` rows and seed for all), then decodes
the first ``--eval-rows`` rows of the task's test split (*King Richard II*, a play no model
saw) greedily and scores them with sacrebleu and rouge-score. Per row:

- ``parameters``: distinct parameters of the trained model;
- ``train tok/s``: the Trainer's last logged throughput (source + target tokens of the batch
  as padded, per second), and ``train s``, the wall time of training with its tokenizer;
- ``val loss``: teacher-forced loss on the validation play (*The Tempest*);
- ``BLEU``, ``chrF``, ``ROUGE-L``: on the test rows (0-100), and ``exact``: the share of
  outputs equal to their reference.

Everything runs in this one process, one model at a time, on ``--threads`` threads.

    python benchmarks/seq2seq.py [--models transformer-tiny,t5-tiny,bart-tiny]
                                 [--tasks shakespeare-piglatin,shakespeare-speakers]
                                 [--iters 300] [--batch-size 16] [--eval-rows 100]
                                 [--train-rows 0] [--threads 2] [--json]
    python benchmarks/seq2seq.py --tiny   # a quick check that it works (a few steps, few rows)

``--train-rows N`` trains on the first N training rows only (0: all). ``--json`` prints one
JSON object as the last line. The defaults are about the budget of the slow test in
``tests/tasks/test_seq2seq.py`` (transformer-tiny there: speakers, 300 steps, BLEU 21.7 /
ROUGE-L 32.5; Pig Latin, 250 steps, chrF 27.1 / ROUGE-L 19.6); each of the six runs takes a few
minutes on two idle cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lmarch.data.shakespeare_tasks import SEQ2SEQ_TASKS, task_rows
from lmarch.errors import LmarchNotice
from lmarch.tasks.seq2seq import evaluate_seq2seq, load_seq2seq, train_seq2seq

MODELS = ("transformer-tiny", "t5-tiny", "bart-tiny")
TASK_NAMES = {"shakespeare-piglatin": "translate", "shakespeare-speakers": "summarize"}


def rows_file(task: str, train_rows: int, folder: Path) -> tuple[Path, float]:
    """A JSONL of the task's training rows (the first ``train_rows``, 0: all) then its
    validation rows, and the ``val_fraction`` that splits exactly the validation rows off."""
    train = task_rows(task, "train")[: train_rows or None]
    valid = task_rows(task, "valid")
    path = folder / f"{task}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in [*train, *valid]:
            f.write(json.dumps({"source": row["source"], "target": row["target"]}) + "\n")
    return path, len(valid) / (len(train) + len(valid))


def bench(model: str, task: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train ``model`` on ``task`` and score it on the test play (module docstring)."""
    data, val_fraction = rows_file(task, args.train_rows, work)
    out = work / f"{model}-{task}"
    settings = {
        "max_iters": args.iters,
        "batch_size": args.batch_size,
        "val_fraction": val_fraction,
        "eval_interval": max(args.iters, 1),
        "log_interval": max(1, min(50, args.iters)),
        "seed": 1337,
    }
    start = time.perf_counter()
    summary = train_seq2seq(
        TASK_NAMES[task], model, str(data), out, settings, eval_rows=0, log=lambda *_: None
    )
    train_s = time.perf_counter() - start
    result = evaluate_seq2seq(out, task, "test", limit=args.eval_rows)
    loaded = load_seq2seq(out)
    return {
        "model": model,
        "task": task,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "vocab": loaded.tokenizer.vocab_size,
        "train_tokens_per_s": summary["tokens_per_s"],
        "train_s": train_s,
        "val_loss": summary["val_loss"],
        **{k: result[k] for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")},
        "test_rows": result["rows"],
        "decode_s": result["decode_s"],
        "example": result["examples"][0],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    head = (
        "| task | model | parameters | train tok/s | train s | val loss | BLEU | chrF | "
        "ROUGE-L | exact |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['task']} | {r['model']} | {r['parameters'] / 1e6:.2f}M | "
        f"{r['train_tokens_per_s']:,.0f} | {r['train_s']:.0f} | {r['val_loss']:.3f} | "
        f"{r['bleu']:.2f} | {r['chrf']:.2f} | {r['rougeL']:.2f} | {r['exact_match']:.1f}% |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tasks", default=",".join(SEQ2SEQ_TASKS))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a quick check: 3 steps, few rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.iters, args.batch_size, args.eval_rows, args.train_rows = 3, 4, 3, 300
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", LmarchNotice)  # long passages cut to 128 tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for model in args.models.split(","):
                rows.append(bench(model, task, args, Path(tmp)))
                r = rows[-1]
                print(
                    f"{task} {model}: BLEU {r['bleu']:.2f}, ROUGE-L {r['rougeL']:.2f} "
                    f"({r['train_s']:.0f} s)",
                    flush=True,
                )
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; {args.iters} steps of {args.batch_size} rows"
        f"{f' (first {args.train_rows} training rows)' if args.train_rows else ''}, "
        f"{args.eval_rows} test rows, greedy\n"
    )
    print(markdown(rows))
    if args.json:
        settings = {k: getattr(args, k) for k in ("iters", "batch_size", "eval_rows", "train_rows")}
        print(json.dumps({"settings": settings, "rows": rows}))


if __name__ == "__main__":
    main()
