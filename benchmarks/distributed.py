"""Training throughput and memory per rank: one process vs DDP vs FSDP2 vs tensor parallel.

Each strategy trains the same GPT (``--layers``, ``--width``, ``--block``) on the same global
batches of char-level tinyshakespeare with lmarch's Trainer: ``single`` in one process, ``ddp``,
``fsdp`` and ``tp`` on ``--nproc`` ranks started as torchrun starts them (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT; gloo on the CPU, NCCL on CUDA). After ``--warmup`` steps, ``--steps``
optimizer steps are timed on every rank (a barrier on each side); tokens/s counts the global
batch. Per rank it reports the training bytes it holds (parameters + gradients + AdamW moments,
from the local shards of FSDP's DTensors) and its peak memory: max RSS of the process on the CPU
(which includes the ~0.3-0.5 GB every PyTorch process carries), ``max_memory_allocated`` on CUDA.

    python benchmarks/distributed.py [--nproc 2] [--steps 10] [--batch 16] [--device cpu] [--json]

On a 2-core machine the ranks share the cores, so data parallelism cannot be faster than one
process there: the rows measure the overhead of each strategy and the memory it saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rank_main(args: argparse.Namespace) -> None:
    """One rank: train, time, measure; print one JSON line."""
    import torch

    from lmarch.data.batches import RandomBlockSampler
    from lmarch.data.corpus import TINY_SHAKESPEARE
    from lmarch.models.gpt import GPT, GPTConfig
    from lmarch.tokenizers import CharTokenizer
    from lmarch.train.config import TrainConfig
    from lmarch.train.distributed import all_reduce_mean, barrier, dist_info, teardown
    from lmarch.train.parallelize import shard_bytes
    from lmarch.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text[:400_000]), dtype=torch.long)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        block_size=args.block,
        n_layer=args.layers,
        n_head=max(1, args.width // 64),
        n_embd=args.width,
    )
    model = GPT(config)
    train = RandomBlockSampler(ids[:360_000], args.block, args.batch, seed=1)
    val = RandomBlockSampler(ids[360_000:], args.block, args.batch, seed=2)
    cfg = TrainConfig(
        batch_size=args.batch,
        max_iters=args.warmup + args.steps,
        warmup_iters=0,
        device=args.device,
        strategy=args.strategy,
    )
    trainer = Trainer(model, train, val, cfg, callbacks=[])
    for _ in range(args.warmup):
        trainer.train_step().item()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step()
    loss.item()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    elapsed = time.perf_counter() - start
    # gradients were freed by the step: count them as one more copy of the local parameters
    held = shard_bytes(trainer.model, trainer.optimizer)
    peak = (
        torch.cuda.max_memory_allocated()
        if trainer.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    row = {
        "rank": dist_info().rank,
        "tokens_per_s": args.steps * args.batch * args.block / elapsed,
        "params_bytes": held.params,
        "grads_bytes": held.params,
        "optim_bytes": held.optimizer,
        "peak_bytes": peak,
        "loss": float(all_reduce_mean(loss)),  # the global batch's loss
    }
    print("RESULT " + json.dumps(row), flush=True)
    trainer.release()  # DDP's reducer must go before the process group does
    teardown()


def launch(strategy: str, nproc: int, args: argparse.Namespace) -> list[dict]:
    """Start ``nproc`` ranks of this script for ``strategy``; their result rows."""
    sys.path.insert(0, str(ROOT))
    from lmarch.train.distributed import free_port

    port = free_port()
    argv = [sys.executable, __file__, "--rank-worker", "--strategy", strategy]
    for name in ("steps", "warmup", "batch", "block", "layers", "width", "threads", "device"):
        argv += [f"--{name}", str(getattr(args, name))]
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        if strategy == "single":
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{strategy}: a rank failed (exit {p.returncode})")
        rows += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rank_worker:
        return rank_main(args)
    results = {}
    runs = [("single", 1)] + [(s, args.nproc) for s in ("ddp", "fsdp", "tp")]
    for strategy, nproc in runs:
        results[strategy] = launch(strategy, nproc, args)
    mib = 2**20
    lines = [
        f"GPT {args.layers} layers x {args.width} wide, block {args.block}, global batch "
        f"{args.batch}, {args.steps} timed steps, {args.threads} thread(s) per rank, "
        f"{args.device}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "",
        "| strategy | ranks | tokens/s (global) | params+grads+AdamW per rank MiB | peak per rank MiB"
        " | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for strategy, rows in results.items():
        held = max(r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"] for r in rows)
        peak = max(r["peak_bytes"] for r in rows)
        tps = min(r["tokens_per_s"] for r in rows)
        lines.append(
            f"| {strategy} | {len(rows)} | {tps:,.0f} | {held / mib:.2f} | {peak / mib:,.0f} | "
            f"{rows[0]['loss']:.4f} |"
        )
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
