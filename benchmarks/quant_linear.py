"""Batch-1 latency of quantised linear layers at SmolLM2-135M's shapes.

One token's activation [1, in] goes through each layer kind:

- ``fp32``: ``nn.Linear`` in float32 (fp32 input);
- ``bf16``: ``nn.Linear`` with bfloat16 weights and a bfloat16 input;
- ``int8``: ``lmarch.quant.Int8WeightOnlyLinear`` (fp32 input, cast to bf16 inside);
- ``int4-g32/g64/g128``: ``lmarch.quant.Int4WeightOnlyLinear`` with that group size
  (fp32 input; "n/a" where in_features is not a multiple of the group size, e.g. 576 / 128);
- with ``--fp32-kernel`` also ``int8-fp32act``: the raw int8 kernel fed fp32 activations, the
  case the layers avoid by casting to bfloat16 (always one warm copy);
- with ``--block-formats`` also llama.cpp's block formats on lmarch's native kernels (fp32
  input): ``q8_0`` / ``q4_1`` (``lmarch.quant.blockq``) and the K-quants ``q4_k`` / ``q5_k`` /
  ``q6_k`` kept as stored (``lmarch.quant.kquants.KQuantLinear``, random valid super-blocks;
  "n/a" where in_features is not a multiple of 256, as for SmolLM2's 576).

By default (``--cache cold``) each kind cycles through copies of its layer that together fill
``--cold-mib`` (128 MiB, several times the last-level cache), so every call streams its weights
from memory as a decoding step through a whole model does; ``--cache warm`` calls one layer
over and over, which flatters the wide formats on layers small enough to stay cached.

The shapes are one decoder block's projections (q/k/v fused 576 -> 960, attention output
576 -> 576, gate/up fused 576 -> 3072, down 1536 -> 576) and the tied output head 576 -> 49152,
plus two whose inputs split into K-quant super-blocks: Gemma 3 270M's down projection
2048 -> 640 and a 1B-class square 2048 -> 2048.
Every layer kind is timed in turn within each round (the order rotates between rounds), a
round timing about ``--target-ms`` of back-to-back calls per kind, each call timed on its own,
so drift in the machine's speed hits all of them alike; reported is the median time per call
over all rounds, in microseconds, and the minimum (on a machine shared with other work the
median carries their interference).

    python benchmarks/quant_linear.py [--repeats 41] [--threads 2] [--cache cold|warm]
                                      [--fp32-kernel] [--block-formats] [--json]

``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lmarch.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_int8

SHAPES: dict[str, tuple[int, int]] = {  # name -> (in_features, out_features)
    "qkv 576->960": (576, 960),
    "attn out 576->576": (576, 576),
    "gate_up 576->3072": (576, 3072),
    "down 1536->576": (1536, 576),
    "head 576->49152": (576, 49152),
    "gemma3 down 2048->640": (2048, 640),
    "square 2048->2048": (2048, 2048),
}
BLOCK = ("qkv 576->960", "attn out 576->576", "gate_up 576->3072", "down 1536->576")
GROUPS = (32, 64, 128)


def rotating(module: nn.Module, x: torch.Tensor, copies: int) -> Callable[[], torch.Tensor]:
    """A call running ``module`` on ``x``, cycling through ``copies`` separate copies of it, so
    that each call reads weights that have left the CPU caches (as in a model's forward)."""
    if copies <= 1:
        return lambda: module(x)
    ring = itertools.cycle([module] + [copy.deepcopy(module) for _ in range(copies - 1)])
    return lambda: next(ring)(x)


def random_kquant_layer(type_name: str, in_features: int, out_features: int) -> nn.Module:
    """A :class:`~lmarch.quant.kquants.KQuantLinear` of random valid super-blocks (random code
    bytes, small positive float16 constants): the timing does not depend on the values."""
    from lmarch.quant.kquants import KQuantLinear
    from lmarch.weights.gguf_kquants import BLOCK_SHAPES

    rng = np.random.default_rng(0)
    _, nbytes = BLOCK_SHAPES[type_name]
    n_blocks = out_features * in_features // 256
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    offsets = (208,) if type_name == "Q6_K" else (0, 2)
    for offset in offsets:
        halves = np.full(n_blocks, 1e-4, dtype=np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return KQuantLinear.from_blocks(torch.from_numpy(blocks.reshape(out_features, -1)), type_name)


def build_engines(
    in_features: int,
    out_features: int,
    fp32_kernel: bool,
    cold_bytes: int,
    block_formats: bool = False,
) -> dict[str, tuple[Callable[[], torch.Tensor], int] | None]:
    """name -> (a zero-argument call running one forward, bytes of weight storage) or None.

    With ``cold_bytes`` > 0 each kind keeps enough copies of its layer to fill that many bytes
    and runs them in turn; with 0 one layer is called again and again (weights stay cached).
    """
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(1, in_features)
    x_bf16 = x.to(torch.bfloat16)
    linear_bf16 = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    linear_bf16.weight.data.copy_(linear.weight.data)

    def nbytes(module: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    def engine(module: nn.Module, inp: torch.Tensor) -> tuple[Callable[[], torch.Tensor], int]:
        size = nbytes(module)
        copies = min(512, -(-cold_bytes // size)) if cold_bytes > 0 else 1
        return rotating(module, inp, copies), size

    engines: dict[str, tuple[Callable[[], torch.Tensor], int] | None] = {
        "fp32": engine(linear, x),
        "bf16": engine(linear_bf16, x_bf16),
        "int8": engine(Int8WeightOnlyLinear.from_linear(linear), x),
    }
    for g in GROUPS:
        if in_features % g:
            engines[f"int4-g{g}"] = None
            continue
        engines[f"int4-g{g}"] = engine(Int4WeightOnlyLinear.from_linear(linear, group_size=g), x)
    if fp32_kernel:
        q, scale = quantize_int8(linear.weight)
        scale32 = scale.float()
        engines["int8-fp32act"] = (
            lambda: torch._weight_int8pack_mm(x, q, scale32),
            q.numel() + scale.numel() * 2,
        )
    if block_formats:
        from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear

        engines["q8_0"] = engine(BlockQ8Linear.from_linear(linear), x)
        engines["q4_1"] = engine(BlockQ4Linear.from_linear(linear), x)
        for type_name in ("Q4_K", "Q5_K", "Q6_K"):
            fits = in_features % 256 == 0
            layer = random_kquant_layer(type_name, in_features, out_features) if fits else None
            engines[type_name.lower()] = engine(layer, x) if layer is not None else None
    return engines


def time_calls(fn: Callable[[], torch.Tensor], inner: int) -> list[float]:
    """Seconds taken by each of ``inner`` back-to-back calls, timed one by one (a call stalled
    by another process then spoils one sample, not a whole batch of them)."""
    times = []
    for _ in range(inner):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_shape(
    engines: dict[str, tuple[Callable[[], torch.Tensor], int] | None],
    repeats: int,
    target_s: float,
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Median and minimum microseconds per call of each engine over interleaved rounds."""
    live = {name: e[0] for name, e in engines.items() if e is not None}
    inner: dict[str, int] = {}
    for name, fn in live.items():  # warm up, then size each sample to about target_s
        for _ in range(3):
            fn()
        per_call = min(time_calls(fn, 5))
        inner[name] = max(1, int(target_s / max(per_call, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].extend(time_calls(live[name], inner[name]))
    median = {n: statistics.median(samples[n]) * 1e6 if n in samples else None for n in engines}
    best = {n: min(samples[n]) * 1e6 if n in samples else None for n in engines}
    return median, best


def markdown(results: dict[str, dict[str, float | None]], engines: list[str]) -> str:
    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

    def ratio(v: float | None, base: float | None) -> str:
        return "" if v is None or base is None else f" ({base / v:.1f}x)"

    header = "| layer (in->out) | " + " | ".join(engines) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in engines) + " |"
    lines = [header, rule]
    block: dict[str, float | None] = {}
    for shape, row in results.items():
        base = row["fp32"]
        cells = [cell(row[e]) + (ratio(row[e], base) if e != "fp32" else "") for e in engines]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        if shape in BLOCK:
            for e in engines:
                prev = block.get(e, 0.0)
                block[e] = None if prev is None or row[e] is None else prev + row[e]
    if all(s in results for s in BLOCK):
        base = block["fp32"]
        cells = [cell(block[e]) + (ratio(block[e], base) if e != "fp32" else "") for e in engines]
        lines.append("| one block (4 projections) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=41, help="interleaved rounds per shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-ms", type=float, default=2.0, help="length of one sample")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset")
    parser.add_argument("--fp32-kernel", action="store_true", help="also time int8 on fp32 input")
    parser.add_argument(
        "--block-formats",
        action="store_true",
        help="also time Q8_0, Q4_1, Q4_K, Q5_K and Q6_K layers on lmarch's native kernels",
    )
    parser.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="cold: cycle through copies of each layer filling --cold-mib, so weights come from "
        "memory as in a whole model; warm: call one layer repeatedly",
    )
    parser.add_argument("--cold-mib", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float | None]] = {}
    minima: dict[str, dict[str, float | None]] = {}
    load_before = os.getloadavg()[0]
    weight_bytes: dict[str, dict[str, int | None]] = {}
    engine_names: list[str] = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            k, n = SHAPES[shape]
            cold = args.cold_mib * 2**20 if args.cache == "cold" else 0
            engines = build_engines(k, n, args.fp32_kernel, cold, args.block_formats)
            engine_names = list(engines)
            results[shape], minima[shape] = bench_shape(engines, args.repeats, args.target_ms / 1e3)
            weight_bytes[shape] = {e: (v[1] if v else None) for e, v in engines.items()}
            print(
                f"{shape}: " + ", ".join(f"{e} {v:.1f} us" for e, v in results[shape].items() if v)
            )

    load = (load_before, os.getloadavg()[0])
    print()
    print(
        f"Batch-1 latency, microseconds per call (speed-up over fp32); torch {torch.__version__}, "
        f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} CPUs, {args.cache} weights"
        + (f" (copies of each layer filling {args.cold_mib} MiB)" if args.cache == "cold" else "")
        + f", 1-min load average {load[0]:.1f} before / {load[1]:.1f} after"
    )
    print()
    print(
        f"Median per call over {args.repeats} interleaved rounds of about {args.target_ms:g} ms each:"
    )
    print()
    print(markdown(results, engine_names))
    print()
    print("Minimum over the same rounds (the least disturbed by other processes):")
    print()
    print(markdown(minima, engine_names))
    if "head 576->49152" in weight_bytes:
        sizes = weight_bytes["head 576->49152"]
        print()
        print(
            "head weight storage: "
            + ", ".join(f"{e} {b / 2**20:.1f} MiB" for e, b in sizes.items() if b is not None)
        )
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "quant_linear",
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "machine": platform.machine(),
                    "repeats": args.repeats,
                    "cache": args.cache,
                    "cold_mib": args.cold_mib if args.cache == "cold" else 0,
                    "unit": "us per call, batch 1",
                    "latency_us": results,
                    "min_latency_us": minima,
                    "load_average": load,
                    "weight_bytes": weight_bytes,
                }
            )
        )


if __name__ == "__main__":
    main()
