"""Recurrent LM training throughput: lmarch's RecurrentLM (the written-out cells, and the fused
kernel that ``accelerate(training=True)`` swaps in) against a plain PyTorch language model of
the same shape (``nn.Embedding`` + ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` + ``nn.Linear``, written
here).

All engines start from the same weights (the plain model's parameter names are lmarch's), see the
same batches — B contiguous streams of char-level tinyshakespeare walked ``block`` characters at
a time (lmarch's ``StreamSampler``) — and carry their detached state from batch to batch
(truncated BPTT). Each step is the same code: next-token cross-entropy, backward, global-norm
clipping to 5, torch AdamW (lmarch's ``build_optimizer``). fp32, no dropout, a fixed thread
count. After warm-up steps the engines are timed in turn, ``--steps`` steps at a time, repeated
``--repeats`` times, interleaved (every other round in reverse order) so that drift in the
machine's speed hits all alike; the median tokens/s of each and the ratios to the plain model are
reported, and (``paired``) the median over rounds of the fused / plain ratio within a round. Each row gives the share of the CPUs other processes used while it was timed (see
benchmarks/train_gpt.py).

    python benchmarks/recurrent.py [--cell lstm|gru|rnn] [--repeats 5] [--steps 10]
                                   [--threads 2] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_gpt import CpuMeter  # the benchmarks' shared load meter (this script's folder)

from lmarch.data.batches import StreamSampler
from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.models import RecurrentLM, RNNConfig
from lmarch.models.registry import PRESETS
from lmarch.native import accelerate
from lmarch.tokenizers import CharTokenizer
from lmarch.train.config import TrainConfig
from lmarch.train.optim import build_optimizer
from lmarch.train.tbptt import CarriedStateLoss

OPTIM = TrainConfig(learning_rate=2e-3, beta2=0.99, weight_decay=0.0, grad_clip=5.0)
OPTIM_TEXT = "torch AdamW from lmarch.train.optim.build_optimizer (lr 2e-3), grad clip 5"
TORCH_LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class PlainRecurrentLM(nn.Module):
    """The textbook PyTorch recurrent LM (as in PyTorch's word_language_model example)."""

    def __init__(self, cell: str, vocab: int, embd: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, embd)
        self.rnn = TORCH_LAYERS[cell](embd, hidden, layers, batch_first=True)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, ids: Tensor, state=None):
        out, state = self.rnn(self.tok_emb(ids), state)
        return self.lm_head(out), state


@dataclass
class Engine:
    name: str
    model: nn.Module
    loss: Callable[[tuple[Tensor, Tensor, Tensor]], Tensor]
    optimizer: torch.optim.Optimizer
    first_loss: float = float("nan")


def plain_loss(model: PlainRecurrentLM) -> Callable:
    """Carried, detached state between batches, written the usual way."""
    carried = {}

    def loss(batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inputs, targets, _ = batch  # the first batch is the only fresh one in a timed run
        logits, state = model(inputs, carried.get("state"))
        carried["state"] = (
            tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        )
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return loss


def make_engines(config: RNNConfig, seed: int, device: str) -> list[Engine]:
    torch.manual_seed(seed)
    reference = RecurrentLM(config).to(device).train()
    fused = accelerate(copy.deepcopy(reference), training=True)  # as the Trainer does
    c = config
    plain = PlainRecurrentLM(c.cell, c.vocab_size, c.n_embd, c.hidden_size, c.n_layer)
    plain.load_state_dict(reference.state_dict())  # same names, same weights
    plain = plain.to(device).train()
    engines = {}
    for name, model in (("lmarch-fused", fused), ("lmarch-reference", reference)):
        loss_fn = CarriedStateLoss()
        step = lambda b, m=model, f=loss_fn: f(m, b)  # noqa: E731
        engines[name] = Engine(name, model, step, build_optimizer(model, OPTIM))
    engines["torch"] = Engine("torch", plain, plain_loss(plain), build_optimizer(plain, OPTIM))
    # fused and torch timed back to back, so each round's ratio of the two sees one machine
    return [engines[name] for name in ("lmarch-fused", "torch", "lmarch-reference")]


def train_step(engine: Engine, batch: tuple[Tensor, ...]) -> Tensor:
    loss = engine.loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(engine.model.parameters(), OPTIM.grad_clip)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=sorted(TORCH_LAYERS), default="lstm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    args.warmup = max(args.warmup, 1)
    torch.set_num_threads(args.threads)

    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tokens = torch.tensor(CharTokenizer.from_text(text).encode(text), dtype=torch.long)
    preset = f"{args.cell}-char-small"
    shape = {**PRESETS[preset].config.__dict__, "dropout": 0.0}
    config = RNNConfig(**{**shape, "vocab_size": int(tokens.max()) + 1})
    batch_size = PRESETS[preset].train["batch_size"]
    sampler = StreamSampler(tokens, config.block_size, batch_size, seed=args.seed)
    batches = [
        tuple(t.to(args.device) for t in sampler.sample()) for _ in range(args.warmup + args.steps)
    ]
    engines = make_engines(config, args.seed, args.device)
    for engine in engines:
        engine.first_loss = train_step(engine, batches[0]).item()
        for b in batches[1 : args.warmup]:
            train_step(engine, b)
    for engine in engines[1:]:
        gap = abs(engine.first_loss - engines[0].first_loss)
        assert gap <= 1e-4, f"first-step loss of {engine.name} differs by {gap:.2e}"

    timed = batches[args.warmup :]
    tokens_per_repeat = len(timed) * batch_size * config.block_size
    rates: dict[str, list[float]] = {e.name: [] for e in engines}
    loads: dict[str, list[float]] = {e.name: [] for e in engines}
    meter = CpuMeter()
    for repeat in range(args.repeats):
        # every other repeat in reverse order, so a drift in the machine's speed evens out
        for engine in engines if repeat % 2 == 0 else engines[::-1]:
            meter.foreign_load()
            start = time.perf_counter()
            for b in timed:
                loss = train_step(engine, b)
            loss.item()
            rates[engine.name].append(tokens_per_repeat / (time.perf_counter() - start))
            loads[engine.name].append(meter.foreign_load())
    results = {
        name: {
            "tokens_per_s": statistics.median(r),
            "best_tokens_per_s": max(r),
            "runs_tokens_per_s": [round(v) for v in r],
            "foreign_load": round(statistics.mean(loads[name]), 3),
        }
        for name, r in rates.items()
    }
    plain = results["torch"]["tokens_per_s"]
    ratios = {
        f"{name}_over_torch": round(r["tokens_per_s"] / plain, 3)
        for name, r in results.items()
        if name != "torch"
    }
    # the same ratio taken in each round (the two timed back to back), then its median
    paired = [f / t for f, t in zip(rates["lmarch-fused"], rates["torch"], strict=True)]
    ratios["paired_lmarch-fused_over_torch"] = round(statistics.median(paired), 3)

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    c = config
    print(
        f"{c.cell.upper()} LM training ({preset} shape, dropout 0): embedding {c.n_embd}, "
        f"{c.n_layer} layers of {c.hidden_size}, vocab {c.vocab_size}, TBPTT {c.block_size}, "
        f"batch {batch_size}; fp32, {args.threads} threads, {where}, torch {torch.__version__}"
    )
    print(f"optimizer (all): {OPTIM_TEXT}")
    print(f"{args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up steps")
    print()
    print("| engine | tokens/s (median) | tokens/s (best) | first-step loss | other load |")
    print("| --- | ---: | ---: | ---: | ---: |")
    labels = {
        "lmarch-fused": "lmarch RecurrentLM, fused kernel (as trained)",
        "lmarch-reference": "lmarch RecurrentLM, written-out cells",
        "torch": f"plain torch nn.{TORCH_LAYERS[c.cell].__name__} LM",
    }
    for engine in engines:
        r = results[engine.name]
        print(
            f"| {labels[engine.name]} | {r['tokens_per_s']:,.0f} | "
            f"{r['best_tokens_per_s']:,.0f} | {engine.first_loss:.6f} | "
            f"{r['foreign_load']:.0%} |"
        )
    print()
    print(", ".join(f"{k.replace('_over_', ' / ')} = {v:.2f}x" for k, v in ratios.items()))
    print("(paired: the median over rounds of that round's ratio, the two timed back to back)")
    if args.json:
        summary = {
            "cell": c.cell,
            "preset": preset,
            "n_embd": c.n_embd,
            "hidden_size": c.hidden_size,
            "n_layer": c.n_layer,
            "block_size": c.block_size,
            "batch_size": batch_size,
            "threads": args.threads,
            "repeats": args.repeats,
            "steps": args.steps,
            "device": where,
            "results": results,
            "ratios": ratios,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
