"""The quality bar: nanoGPT's CPU recipe for char-level Shakespeare against our own recipe.

nanoGPT's recipe (README, "I only have a macbook"; config/train_shakespeare_char.py plus its
command line): 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, learning rate
1e-3 with 100 warm-up iterations and a cosine decay to 1e-4 at 2000, beta2 0.99, weight decay
0.1, clipping at 1.0, no dropout, evaluated every 250 iterations on 20 random batches per split;
first 90% of tinyshakespeare.txt for training, last 10% for validation. nanoGPT reports a
validation loss of 1.88. Both recipes are trained by lmarch's Trainer, built exactly as
``lmarch train`` builds it.

Our recipe is a TOML file (``lmarch/train/recipes/shakespeare_char_fast.toml`` by default) that
``lmarch train --preset gpt-char-tiny --config FILE --data tinyshakespeare.txt`` also reads. Its
iteration count was chosen so that it trains in no more time than nanoGPT's recipe: it has the
same model and batch, so the same cost per step, and it spends on 80 extra steps what nanoGPT's
recipe spends on seven intermediate evaluations. Both wall times are measured in this run and
printed side by side, with the CPU time of the process and the share of the CPUs that other
processes took meanwhile. On a shared machine the wall times can be far apart for no fault of
either recipe (a thread pool that loses a core stalls at every barrier); with ``--threads 1``
the CPU time is the steadier measure of the budget.

Reported for each recipe: the exact validation loss over the whole split (every token scored
once, ``evaluate_tokens``), the estimate nanoGPT would print (mean over random batches, here 200),
the wall time and CPU time of training (the recipe's own evaluations included), and tokens/s.

    python benchmarks/quality_bar.py [--recipe FILE.toml] [--only nanogpt|ours]
                                     [--set key=value ...] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmarch.data import RandomBlockSampler, load_documents, train_val_split
from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.models.registry import build_model, get_preset, replace_config
from lmarch.tokenizers import CharTokenizer
from lmarch.train.config import TrainConfig
from lmarch.train.evaluate import evaluate_tokens
from lmarch.train.run import encode, parse_set_options, read_config_file, split_overrides
from lmarch.train.trainer import Trainer, causal_lm_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpt import CpuMeter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = TINY_SHAKESPEARE
OUR_RECIPE = ROOT / "lmarch" / "train" / "recipes" / "shakespeare_char_fast.toml"
PRESET = "gpt-char-tiny"
NANOGPT_VAL_LOSS = 1.88
NANOGPT = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "block_size": 64,
    "dropout": 0.0,
    "batch_size": 12,
    "max_iters": 2000,
    "lr_decay_iters": 2000,
    "learning_rate": 1e-3,
    "min_lr": 1e-4,
    "warmup_iters": 100,
    "beta1": 0.9,
    "beta2": 0.99,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_interval": 250,
    "eval_iters": 20,
    "log_interval": 100,
    "dtype": "float32",
    "compile": False,
    "seed": 1337,
}
ESTIMATE_BATCHES = 200


def process_cpu_s() -> float:
    """CPU seconds this process (all its threads) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_recipe(name: str, overrides: dict[str, Any], train_text: str, val_text: str) -> dict:
    """Train ``gpt-char-tiny`` with ``overrides`` as ``train_run`` would; time and score it."""
    preset = get_preset(PRESET)
    model_over, train_over = split_overrides(preset.family, overrides)
    cfg = TrainConfig(**{**preset.train, **train_over, "device": "cpu"})
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    model_cfg = replace_config(preset.config, **model_over, vocab_size=tokenizer.vocab_size)
    block = model_cfg.block_size
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)

    meter = CpuMeter()
    cpu_start = process_cpu_s()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    trainer = Trainer(
        model,
        RandomBlockSampler(train_ids, block, cfg.batch_size, cfg.seed),
        RandomBlockSampler(val_ids, block, cfg.batch_size, cfg.seed + 1),
        cfg,
    )
    result = trainer.fit()
    wall = time.perf_counter() - start
    cpu = process_cpu_s() - cpu_start
    load = meter.foreign_load()

    exact = evaluate_tokens(model, val_ids, block)
    sampler = RandomBlockSampler(val_ids, block, 12, seed=0)
    with torch.no_grad():
        losses = [causal_lm_loss(model, sampler.sample()).item() for _ in range(ESTIMATE_BATCHES)]
    tokens = result.iters * cfg.batch_size * block * cfg.gradient_accumulation_steps
    return {
        "recipe": name,
        "settings": {**overrides},
        "params": sum(p.numel() for p in model.parameters()),
        "iters": result.iters,
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "tokens_per_s": round(tokens / wall),
        "foreign_load": round(load, 3),
        "train_loss_last": round(result.train_loss, 4),
        "val_loss_exact": round(exact["loss"], 4),
        "val_loss_estimate": round(statistics.mean(losses), 4),
        "val_loss_estimate_sem": round(statistics.stdev(losses) / len(losses) ** 0.5, 4),
        "val_tokens_scored": exact["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(OUR_RECIPE), help="our recipe (TOML)")
    parser.add_argument("--only", choices=["nanogpt", "ours"], help="run just one recipe")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override our recipe"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    train_text, val_text = train_val_split(load_documents(args.data), 0.1)
    ours = {**read_config_file(args.recipe), **parse_set_options(args.set)}
    runs = []
    if args.only in (None, "nanogpt"):
        runs.append(run_recipe("nanoGPT", NANOGPT, train_text, val_text))
    if args.only in (None, "ours"):
        runs.append(run_recipe(f"ours ({Path(args.recipe).name})", ours, train_text, val_text))

    print(
        f"char-level tinyshakespeare ({len(train_text):,} train / {len(val_text):,} val chars); "
        f"fp32, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
    print()
    print(
        "| recipe | iters | wall s | CPU s | tokens/s | val loss (exact) "
        "| val loss (200 batches) | last train loss | other load |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        print(
            f"| {r['recipe']} | {r['iters']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['tokens_per_s']:,} | "
            f"{r['val_loss_exact']:.4f} | {r['val_loss_estimate']:.4f} "
            f"± {r['val_loss_estimate_sem']:.4f} | {r['train_loss_last']:.4f} | "
            f"{r['foreign_load']:.0%} |"
        )
    print()
    for r in runs:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        print(f"{r['recipe']}: {settings}")
    summary: dict[str, Any] = {"runs": runs, "threads": args.threads, "torch": torch.__version__}
    if len(runs) == 2:
        nano, mine = runs
        summary["wall_ratio_ours_over_nanogpt"] = round(mine["wall_s"] / nano["wall_s"], 3)
        summary["cpu_ratio_ours_over_nanogpt"] = round(mine["cpu_s"] / nano["cpu_s"], 3)
        summary["val_loss_gain_exact"] = round(nano["val_loss_exact"] - mine["val_loss_exact"], 4)
        print(
            f"\nours took {summary['wall_ratio_ours_over_nanogpt']:.2f}x nanoGPT's wall time "
            f"({summary['cpu_ratio_ours_over_nanogpt']:.2f}x its CPU time); "
            f"exact val loss {nano['val_loss_exact']:.4f} -> {mine['val_loss_exact']:.4f}"
        )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
