"""GPT training throughput: lmarch's GPT against transformers' GPT2LMHeadModel of the same shape.

Both models start from the same weights (copied across with GPT2_MAP), see the same batches of
char-level tinyshakespeare in the same order, and are trained by the same code: one loss
function (next-token cross-entropy on the logits), lmarch's ``build_optimizer`` (torch AdamW,
fused, weight decay on matrices only) and global-norm clipping to 1.0 — so only the model
differs. fp32, a fixed thread count. After warm-up steps the engines are timed in turn,
``--steps`` optimizer steps at a time, repeated ``--repeats`` times and interleaved
(lmarch, hf, hf-eager, lmarch, ...) so that drift in the machine's speed hits all of them alike;
the median tokens/s of each engine and the ratio lmarch / hf are reported per mode. In the
``compiled`` mode both models go through ``torch.compile``; the first step (which compiles) is
timed separately and kept out of the throughput. HF runs with its default attention (sdpa); its
eager attention is an extra line in the eager mode. Each row also gives the share of the CPUs
that other processes used while it was timed: on a shared machine a thread pool that loses a
core stalls at every barrier, so rows with a large share are not worth much.

    python benchmarks/train_gpt.py [--shape tiny|small] [--modes eager,compiled]
                                   [--repeats 7] [--steps 20] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from lmarch.data import RandomBlockSampler
from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.models import GPT
from lmarch.native import accelerate
from lmarch.tokenizers import CharTokenizer
from lmarch.train.config import TrainConfig
from lmarch.train.optim import build_optimizer
from lmarch.weights.hf_gpt2 import GPT2_MAP, gpt_config_from_hf

DATA = TINY_SHAKESPEARE

# (n_layer, n_head, n_embd, block_size, batch_size)
SHAPES = {
    "tiny": (4, 4, 128, 64, 12),  # nanoGPT's CPU recipe for shakespeare_char
    "small": (6, 6, 384, 256, 8),  # nanoGPT's shakespeare_char model, smaller batch
}
# nanoGPT's shakespeare_char hyper-parameters; the rate is held constant (no schedule).
OPTIM = TrainConfig(learning_rate=1e-3, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
OPTIM_TEXT = (
    "torch.optim.AdamW(fused=True) from lmarch.train.optim.build_optimizer "
    "(lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices), grad clip 1.0"
)


class CpuMeter:
    """How busy the CPUs were with *other* processes between two readings.

    The machines this runs on can be shared; a thread pool that loses a core to another
    process stalls at every barrier, so each timing is reported with this figure beside it.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        tick = os.sysconf("SC_CLK_TCK")
        return busy / tick, usage.ru_utime + usage.ru_stime, time.perf_counter()

    def foreign_load(self) -> float:
        """Fraction of all CPUs' time used by other processes since the last call."""
        now = self._read()
        busy, own, wall = (b - a for a, b in zip(self.start, now))
        self.start = now
        return max(0.0, busy - own) / max(wall * (os.cpu_count() or 1), 1e-9)


@dataclass
class Engine:
    """One model under test and the callable that maps input ids to logits."""

    name: str
    model: nn.Module
    logits: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    compile_s: float = 0.0
    first_loss: float = float("nan")


def hf_config(shape: str, vocab_size: int, attn: str) -> transformers.GPT2Config:
    n_layer, n_head, n_embd, block, _ = SHAPES[shape]
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=block,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,  # training: no key/value cache to build
        attn_implementation=attn,
    )


def make_models(shape: str, vocab_size: int, seed: int, hf_eager: bool) -> dict[str, nn.Module]:
    """lmarch's GPT and the HF model(s), all holding the same randomly initialised weights."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(hf_config(shape, vocab_size, "sdpa"))
    theirs = hf.state_dict()
    ours = GPT(gpt_config_from_hf(hf.config.to_dict()))
    missing, unexpected = ours.load_state_dict(
        GPT2_MAP.to_ours(theirs, ours.config.n_layer), strict=False
    )
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    models = {"lmarch": ours, "hf": hf}
    if hf_eager:
        hf_e = transformers.GPT2LMHeadModel(hf_config(shape, vocab_size, "eager"))
        hf_e.load_state_dict(theirs)
        models["hf-eager"] = hf_e
    for model in models.values():
        model.train()
    return models


def make_engine(name: str, model: nn.Module, compiled: bool) -> Engine:
    if isinstance(model, GPT):
        accelerate(model, training=True)  # lmarch's native fast paths, as the Trainer does
    module = torch.compile(model) if compiled else model
    if isinstance(model, GPT):
        logits = module
    else:

        def logits(ids: Tensor) -> Tensor:
            return module(input_ids=ids).logits

    return Engine(name, model, logits, build_optimizer(model, OPTIM))


def train_step(engine: Engine, batch: tuple[Tensor, Tensor]) -> Tensor:
    """One optimizer step; the same code for every engine."""
    inputs, targets = batch
    logits = engine.logits(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(engine.model.parameters(), OPTIM.grad_clip)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_mode(
    mode: str, shape: str, tokens: Tensor, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Median tokens/s (and more) of each engine in one mode: ``eager`` or ``compiled``."""
    n_layer, n_head, n_embd, block, batch_size = SHAPES[shape]
    sampler = RandomBlockSampler(tokens, block, batch_size, seed=args.seed)
    batches = [sampler.sample() for _ in range(args.warmup + args.steps)]
    compiled = mode == "compiled"
    # The eager-attention HF line is an extra, measured in the eager mode only (compiling a
    # third model would add a minute and say little: Inductor rewrites its attention anyway).
    hf_eager = not args.no_hf_eager and not compiled
    models = make_models(shape, int(tokens.max()) + 1, args.seed, hf_eager)
    engines = [make_engine(name, m, compiled) for name, m in models.items()]

    torch._dynamo.reset()
    for engine in engines:
        start = time.perf_counter()
        engine.first_loss = train_step(engine, batches[0]).item()
        engine.compile_s = time.perf_counter() - start if compiled else 0.0
        for b in batches[1 : args.warmup]:
            train_step(engine, b)
    ref = engines[0].first_loss
    for engine in engines[1:]:
        gap = abs(engine.first_loss - ref)
        assert gap <= 1e-4, f"{mode}: first-step loss of {engine.name} differs by {gap:.2e}"

    timed = batches[args.warmup :]
    tokens_per_repeat = len(timed) * batch_size * block
    rates: dict[str, list[float]] = {e.name: [] for e in engines}
    loads: dict[str, list[float]] = {e.name: [] for e in engines}
    meter = CpuMeter()
    for _ in range(args.repeats):
        for engine in engines:
            meter.foreign_load()
            start = time.perf_counter()
            for b in timed:
                loss = train_step(engine, b)
            loss.item()
            rates[engine.name].append(tokens_per_repeat / (time.perf_counter() - start))
            loads[engine.name].append(meter.foreign_load())
    return {
        e.name: {
            "tokens_per_s": statistics.median(rates[e.name]),
            "ms_per_step": 1000 * batch_size * block / statistics.median(rates[e.name]),
            "best_tokens_per_s": max(rates[e.name]),
            "runs_tokens_per_s": [round(r) for r in rates[e.name]],
            "runs_foreign_load": [round(v, 2) for v in loads[e.name]],
            "foreign_load": round(statistics.mean(loads[e.name]), 3),
            "first_loss": e.first_loss,
            "compile_s": round(e.compile_s, 1),
        }
        for e in engines
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--modes", default="eager,compiled", help="comma list: eager,compiled")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--no-hf-eager", action="store_true", help="skip the HF eager-attn line")
    parser.add_argument("--data", default=str(DATA), help="text file (char-level)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"eager", "compiled"} or args.repeats < 1 or args.steps < 1:
        parser.error("--modes takes eager and/or compiled; --repeats and --steps must be >= 1")
    args.warmup = max(args.warmup, 2)

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # GPT2Config's default bos/eos ids exceed 65
    text = Path(args.data).read_text(encoding="utf-8")
    tokens = torch.tensor(CharTokenizer.from_text(text).encode(text), dtype=torch.long)
    n_layer, n_head, n_embd, block, batch_size = SHAPES[args.shape]

    # A fresh Inductor cache, so that the compile times are cold for both models.
    with tempfile.TemporaryDirectory(prefix="train_gpt_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        if "compiled" in modes:  # pay the once-per-process start-up of Inductor up front
            torch.compile(lambda t: t * 2 + 1)(torch.ones(8))
        results = {mode: run_mode(mode, args.shape, tokens, args) for mode in modes}

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"GPT training, shape {args.shape}: {n_layer} layers, {n_head} heads, {n_embd} wide, "
        f"block {block}, batch {batch_size}; fp32, {args.threads} threads, {cpu}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"optimizer (both): {OPTIM_TEXT}")
    print(f"{args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up steps")
    print()
    print(
        "| mode | engine | tokens/s (median) | tokens/s (best) | ms/step (median) "
        "| first-step loss | compile s | other load |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = {}
    for mode, engines in results.items():
        for name, r in engines.items():
            label = {"hf": "transformers (sdpa)", "hf-eager": "transformers (eager attn)"}
            print(
                f"| {mode} | {label.get(name, name)} | {r['tokens_per_s']:,.0f} | "
                f"{r['best_tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                f"{r['first_loss']:.6f} | {r['compile_s'] if mode == 'compiled' else '-'} | "
                f"{r['foreign_load']:.0%} |"
            )
        ours = engines["lmarch"]["tokens_per_s"]
        ratios[mode] = {
            f"lmarch_over_{name}": round(ours / r["tokens_per_s"], 3)
            for name, r in engines.items()
            if name != "lmarch"
        }
        best = engines["lmarch"]["best_tokens_per_s"]
        ratios[mode].update(
            {
                f"best_lmarch_over_{name}": round(best / r["best_tokens_per_s"], 3)
                for name, r in engines.items()
                if name != "lmarch"
            }
        )
    print()
    for mode, r in ratios.items():
        text_ratios = ", ".join(f"{k.replace('_over_', ' / ')} = {v:.2f}x" for k, v in r.items())
        print(f"{mode}: {text_ratios}")
    if args.json:
        summary = {
            "shape": args.shape,
            "n_layer": n_layer,
            "n_head": n_head,
            "n_embd": n_embd,
            "block_size": block,
            "batch_size": batch_size,
            "threads": args.threads,
            "repeats": args.repeats,
            "steps": args.steps,
            "optimizer": OPTIM_TEXT,
            "results": results,
            "ratios": ratios,
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
