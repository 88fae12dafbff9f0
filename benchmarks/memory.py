"""Peak memory and time of one training step: gradient checkpointing on/off, fp32 and bf16.

The model is a 12-layer GPT shaped so that activations dominate (default d=384, 6 heads,
T=512, batch 8, a 512-token vocabulary: ~1.2 GB of saved activations, ~80 MiB of weights).
Each case runs the real :class:`lmarch.train.trainer.Trainer` (native fast paths swapped in, as
``lmarch train`` does) with ``grad_checkpointing`` and ``precision`` set, in a fresh child process:

1. one untimed warm-up step (AdamW's moment buffers are allocated there);
2. the peak resident set is reset (``/proc/self/clear_refs`` = 5) and the resident set read;
3. timed steps; the peak (``VmHWM``) minus the resident set before them is the step's peak
   memory growth: activations kept for the backward, gradients, temporaries.

The child runs with glibc's mmap threshold fixed at 128 KiB, so a freed tensor's memory goes
back to the system and the next step's growth is measured from the same baseline (PyTorch's
CPU allocator is plain malloc). Without ``clear_refs`` (not Linux) the whole-process peak since
start is reported instead, warm-up included, and marked so.

    python benchmarks/memory.py [--n-layer 12] [--n-embd 384] [--n-head 6] [--block-size 512]
                                [--batch-size 8] [--vocab 512] [--repeats 3] [--json]

Goal (issue 12): checkpointing saves >= 40% of the fp32 step's peak memory growth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from peak_rss import reset_peak, status_kib

CASES = (
    ("fp32", False),
    ("fp32", True),
    ("bf16", False),
    ("bf16", True),
)


def _child(args: argparse.Namespace, precision: str, checkpointing: bool) -> dict:
    """Run one case in this (fresh) process: time and peak memory growth of a training step."""
    import torch

    from lmarch.data.batches import RandomBlockSampler
    from lmarch.models import GPT, GPTConfig
    from lmarch.native.swaps import native_modules
    from lmarch.train.checkpointing import checkpointed_blocks
    from lmarch.train.config import TrainConfig
    from lmarch.train.trainer import Trainer

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer,
            n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
        )
    )  # fmt: skip
    tokens = torch.randint(0, args.vocab, (args.batch_size * args.block_size * 4,))
    cfg = TrainConfig(
        batch_size=args.batch_size, max_iters=1000, warmup_iters=0, device="cpu",
        precision=precision, grad_checkpointing=checkpointing,
    )  # fmt: skip
    sampler = RandomBlockSampler(tokens, args.block_size, args.batch_size, 0)
    trainer = Trainer(model, sampler, sampler, cfg)
    trainer.train_step().item()  # warm-up: AdamW's state is allocated here
    reset = reset_peak()
    before = status_kib("VmRSS")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        trainer.train_step().item()
        times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "precision": precision,
        "checkpointing": checkpointing,
        "step_s": statistics.median(times),
        "repeats": args.repeats,
        "peak_growth_mib": max(peak - before, 0) / 1024,
        "process_peak_mib": peak / 1024,
        "peak_reset": reset,
        "weights_mib": weights / 2**20,
        "checkpointed_blocks": checkpointed_blocks(trainer.model),
        "native_blocks": native_modules(trainer.model)["NativeGPTBlock"],
        "threads": torch.get_num_threads(),
    }


SHAPE_FLAGS = ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "vocab", "repeats")


def _case(args: argparse.Namespace, precision: str, checkpointing: bool) -> dict:
    """One case in a fresh Python process (one case's peak cannot hide another's)."""
    cmd = [sys.executable, __file__, "--child", precision, str(int(checkpointing))]
    for name in SHAPE_FLAGS:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--dropout", str(args.dropout)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {precision} checkpointing={checkpointing} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (median)")
    parser.add_argument("--cases", default="all", help="'all' or 'fp32' (checkpointing only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        precision, checkpointing = args.child
        print(json.dumps(_child(args, precision, bool(int(checkpointing)))))
        return

    cases = CASES if args.cases == "all" else CASES[:2]
    print(
        f"GPT {args.n_layer} layers, d={args.n_embd}, {args.n_head} heads, T={args.block_size}, "
        f"batch {args.batch_size}, vocab {args.vocab}, dropout {args.dropout}"
    )
    print(
        f"{'precision':>9} {'checkpointing':>13} {'step s':>8} {'peak MiB':>9} {'process MiB':>11}"
    )
    rows = []
    for precision, checkpointing in cases:
        row = _case(args, precision, checkpointing)
        rows.append(row)
        mark = "" if row["peak_reset"] else " (peak since start)"
        print(
            f"{precision:>9} {'on' if checkpointing else 'off':>13} {row['step_s']:>8.3f} "
            f"{row['peak_growth_mib']:>9.1f} {row['process_peak_mib']:>11.1f}{mark}"
        )
        sys.stdout.flush()
    by = {(r["precision"], r["checkpointing"]): r for r in rows}
    summary: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        off, on = by.get((precision, False)), by.get((precision, True))
        if off and on:
            saving = 1 - on["peak_growth_mib"] / max(off["peak_growth_mib"], 1e-9)
            summary[f"{precision}_memory_saving"] = saving
            summary[f"{precision}_checkpointing_time_ratio"] = on["step_s"] / off["step_s"]
            print(
                f"{precision}: checkpointing saves {100 * saving:.1f}% of the step's peak memory "
                f"growth (goal >= 40%), step time x{on['step_s'] / off['step_s']:.2f}"
            )
    if ("bf16", False) in by:
        ratio = by[("bf16", False)]["step_s"] / by[("fp32", False)]["step_s"]
        summary["bf16_over_fp32_time"] = ratio
        print(f"bf16 autocast step time / fp32: {ratio:.2f}x")
    if args.json:
        print(json.dumps({"shape": {k: getattr(args, k) for k in SHAPE_FLAGS}, "rows": rows,
                          "summary": summary}))  # fmt: skip


if __name__ == "__main__":
    main()
