"""Attention forward + backward: time and peak memory of three engines over sequence length.

Engines, all fp32 on the CPU, batch 1, 8 heads, head dim 64, no mask (every query sees every key):

- ``naive``: :func:`lmarch.nn.attention.reference_attention`, the equation written out (it forms
  and saves the T x T scores and probabilities);
- ``flash``: :func:`lmarch.nn.flash.flash_attention`, FlashAttention written out in torch tiles
  (blocks of 128 x 128);
- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` restricted to its flash backend
  (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), the fused C++ kernel.

Each (engine, T) runs in a fresh child process, so peak memory is that process's maximum
resident set (``getrusage``) minus its resident set just before the first call: the growth the
attention call itself causes. Time is the median of the repeats of forward + backward.

    python benchmarks/attention.py [--lengths 512,1024,2048,4096,8192] [--repeats 3] [--json]

``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

ENGINES = ("naive", "flash", "sdpa")
HEADS, HEAD_DIM = 8, 64


def _rss_kib() -> int:
    """Current resident set of this process in KiB (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _child(engine: str, length: int, repeats: int) -> dict:
    """Run one case in this (fresh) process and return its time and peak memory growth."""
    import torch

    from lmarch.nn.attention import reference_attention
    from lmarch.nn.flash import flash_attention

    def run(leaves: list[torch.Tensor], grad: torch.Tensor) -> None:
        if engine == "naive":
            out = reference_attention(*leaves)
        elif engine == "flash":
            out = flash_attention(*leaves)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(*leaves)
        out.backward(grad)
        for x in leaves:
            x.grad = None

    gen = torch.Generator().manual_seed(0)
    # a small warm-up call first, so libraries' one-time set-up is not counted as the case's memory
    warm = [torch.randn(1, HEADS, 256, HEAD_DIM, generator=gen).requires_grad_(True) for _ in "qkv"]
    run(warm, torch.randn(1, HEADS, 256, HEAD_DIM, generator=gen))
    del warm
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=gen) for _ in range(3))
    grad = torch.randn(1, HEADS, length, HEAD_DIM, generator=gen)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    before = max(_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(leaves, grad)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "engine": engine,
        "T": length,
        "seconds": statistics.median(times),
        "repeats": repeats,
        "peak_mib": max(peak - before, 0) / 1024,
        "threads": torch.get_num_threads(),
    }


def _case(engine: str, length: int, repeats: int) -> dict:
    """One case in a fresh Python process (so one case's peak does not hide another's)."""
    cmd = [sys.executable, __file__, "--child", engine, str(length), str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per case (median)")
    parser.add_argument(
        "--long-repeats", type=int, default=1, help="repeats for T >= 4096 (naive is slow there)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, length, repeats = args.child
        print(json.dumps(_child(engine, int(length), int(repeats))))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    print(f"{'T':>6} {'engine':>6} {'seconds':>9} {'peak MiB':>9}")
    for length in lengths:
        repeats = args.long_repeats if length >= 4096 else args.repeats
        for engine in ENGINES:
            row = _case(engine, length, repeats)
            rows.append(row)
            print(f"{length:>6} {engine:>6} {row['seconds']:>9.3f} {row['peak_mib']:>9.1f}")
            sys.stdout.flush()
    summary = {}
    for length in lengths:
        by = {r["engine"]: r for r in rows if r["T"] == length}
        summary[length] = {
            "flash_over_sdpa_time": by["flash"]["seconds"] / by["sdpa"]["seconds"],
            "flash_over_naive_memory": by["flash"]["peak_mib"] / max(by["naive"]["peak_mib"], 1e-9),
        }
        print(
            f"T={length}: flash/sdpa time {summary[length]['flash_over_sdpa_time']:.2f}x, "
            f"flash/naive peak memory {summary[length]['flash_over_naive_memory']:.4f}"
        )
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
