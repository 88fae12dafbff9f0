"""The architecture table, measured: language models of every generation trained on the same
text, the same characters and the same split, for the same wall-clock budget.

Histories of language modelling list the families in order — n-grams, recurrent networks,
LSTM / GRU, transformers — with a table of their properties written by hand. Here each row is a
run: a count-based n-gram model (Kneser-Ney), an Elman RNN, an LSTM, a GRU, a GPT and a LLaMA,
each given ``budget_seconds`` of training on the same machine, then scored on the whole held-out
split in nats per character (the same tokens for all: characters) and bits per character
(nats / ln 2). With ``match_params`` every neural model is resized to that many parameters.

The neural models train with their presets' recipes (learning rate, batch, truncated-BPTT or
context length) and the one Trainer; the cosine schedule is fitted to the budget: a few timed
steps estimate how many steps the budget holds, and the schedule decays over that many. The
clock counts training only (not the evaluations drawn for the loss-against-time curve). A
recurrent model is scored as it is trained: on contiguous streams, its state carried across
windows (:func:`lmarch.train.evaluate.evaluate_streams`); the transformers on consecutive windows
of their context length (:func:`lmarch.train.evaluate.evaluate_tokens`); the n-gram model on every
line (:meth:`lmarch.classic.ngram.NgramLM.evaluate_text`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmarch.errors import LmarchError

# model name -> (preset, what it is)
NEURAL_MODELS: dict[str, tuple[str, str]] = {
    "bigram": ("bigram-char", "neural bigram table"),
    "rnn": ("rnn-char-small", "recurrent (Elman, tanh)"),
    "lstm": ("lstm-char-small", "recurrent (LSTM)"),
    "gru": ("gru-char-small", "recurrent (GRU)"),
    "gpt": ("gpt-char-tiny", "transformer (GPT-2 style)"),
    "llama": ("llama-tiny", "transformer (LLaMA style)"),
}
MODELS = ("ngram", *NEURAL_MODELS)
DEFAULT_MODELS = ("ngram", "rnn", "lstm", "gru", "gpt", "llama")


@dataclass
class CompareConfig:
    """What to compare and how long each model trains."""

    data: str = "shakespeare"
    budget_seconds: float = 60.0
    models: Sequence[str] = DEFAULT_MODELS
    match_params: int | None = None  # resize every neural model to about this many parameters
    ngram_order: int = 5
    val_chars: int | None = None  # score only the first N characters of the held-out split
    curve_points: int = 8  # evaluations drawn during training, for the loss-against-time plot
    sample_chars: int = 200
    max_steps: int | None = None  # cap (and fit the schedule to) this many steps: deterministic
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.budget_seconds > 0:
            raise LmarchError(f"--budget-seconds must be > 0, got {self.budget_seconds}")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise LmarchError(
                f"unknown model(s) {', '.join(unknown) or '(none given)'}",
                hint=f"choose from {', '.join(MODELS)}",
            )
        if self.match_params is not None and self.match_params < 1000:
            raise LmarchError(f"--match-params must be >= 1000, got {self.match_params}")
        if self.ngram_order < 1:
            raise LmarchError(f"the n-gram order must be >= 1, got {self.ngram_order}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LmarchError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.val_chars is not None and self.val_chars < 1000:
            raise LmarchError(f"--val-chars must be >= 1000, got {self.val_chars}")


@dataclass
class CompareRow:
    """One model's measured line of the table."""

    model: str
    kind: str
    params: int
    train_s: float
    steps: int
    tokens_per_s: float
    val_loss: float  # nats per character of the held-out split
    sample: str
    curve: list[tuple[float, float]] = field(default_factory=list)  # (training s, val loss)

    @property
    def bits_per_char(self) -> float:
        """Cross-entropy in bits per character: val_loss / ln 2."""
        return self.val_loss / math.log(2)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, ``bits_per_char`` included."""
        return {**dataclasses.asdict(self), "bits_per_char": self.bits_per_char}


def read_splits(data: str, val_chars: int | None = None) -> tuple[str, str]:
    """(train, validation) text of a corpus, split as ``lmarch train`` splits it."""
    from lmarch.data.corpus import load_documents, train_val_split
    from lmarch.train.config import TrainConfig

    train, val = train_val_split(load_documents(data), TrainConfig().val_fraction)
    if not train.strip() or not val.strip():
        raise LmarchError(f"corpus {data} holds no text to compare on")
    return train, val[:val_chars] if val_chars else val


def resize_to(config: Any, n_params: int) -> Any:
    """``config`` with its width changed so that the model has about ``n_params`` parameters:
    the recurrent hidden size (:func:`lmarch.models.rnn.config_for_budget`), or a transformer's
    ``n_embd`` in steps of twice its head count (heads keep an even size for rotary
    positions), the largest not above the budget."""
    from lmarch.models.registry import count_parameters, family_of_config, replace_config

    family = family_of_config(config).name
    if family == "rnn":
        from lmarch.models.rnn import config_for_budget

        fields = dataclasses.asdict(config)
        fields.pop("hidden_size")
        fields.pop("n_embd")
        return config_for_budget(n_params, **fields)
    if family == "bigram":
        return config  # its size is the vocabulary squared
    step = 2 * config.n_head

    def sized(k: int) -> Any:
        changes: dict[str, Any] = {"n_embd": k * step}
        if hasattr(config, "intermediate_size"):  # LLaMA's SwiGLU width follows d
            changes["intermediate_size"] = max(
                1, round(config.intermediate_size * k * step / config.n_embd)
            )
        return replace_config(config, **changes)

    low, high = 1, 2
    while count_parameters(sized(high)) <= n_params:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count_parameters(sized(mid)) <= n_params else (low, mid)
    return sized(low)


def _sample_text(model: torch.nn.Module, tokenizer: Any, chars: int, seed: int) -> str:
    from lmarch.generation import SamplingConfig, generate

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([tokenizer.encode("\n")])
    device = next(model.parameters()).device
    with torch.no_grad():
        ids = generate(
            model.eval(),
            prompt.to(device),
            chars,
            SamplingConfig(temperature=0.8),
            generator=generator,
        )
    return tokenizer.decode(ids[0, 1:].tolist())


def run_ngram(cfg: CompareConfig, train: str, val: str) -> CompareRow:
    """Count a character n-gram model (modified Kneser-Ney) and score the held-out text. Its
    "parameters" are the n-gram counts it stores; it trains once, without a budget."""
    from lmarch.classic.ngram import NgramConfig, NgramLM

    start = time.perf_counter()
    model = NgramLM.fit_text(
        train, NgramConfig(order=cfg.ngram_order, smoothing="mkn", unit="char")
    )
    train_s = time.perf_counter() - start
    score = model.evaluate_text(val)
    stored = model.num_parameters
    return CompareRow(
        model="ngram",
        kind=f"count-based {cfg.ngram_order}-gram, modified Kneser-Ney",
        params=int(stored),
        train_s=train_s,
        steps=1,
        tokens_per_s=len(train) / max(train_s, 1e-9),
        val_loss=score.nats / score.characters,
        sample=model.sample(cfg.sample_chars, seed=cfg.seed, prompt=""),
        curve=[(train_s, score.nats / score.characters)],
    )


def run_neural(
    name: str,
    cfg: CompareConfig,
    tokenizer: Any,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    log: Callable[[str], None] = print,
) -> CompareRow:
    """Train model ``name`` for ``cfg.budget_seconds`` of training time and score it."""
    from lmarch.models.registry import build_model, family_of_config, get_preset, replace_config
    from lmarch.settings import build_config
    from lmarch.train.config import TrainConfig
    from lmarch.train.evaluate import evaluate_streams, evaluate_tokens
    from lmarch.train.run import clm_batches, clm_loss
    from lmarch.train.trainer import Trainer

    preset_name, kind = NEURAL_MODELS[name]
    preset = get_preset(preset_name)
    model_cfg = replace_config(preset.config, vocab_size=tokenizer.vocab_size)
    if cfg.match_params:
        model_cfg = resize_to(model_cfg, cfg.match_params)
    base = {**preset.train, "device": cfg.device, "seed": cfg.seed, "eval_iters": 4}

    def trainer_for(steps: int) -> Trainer:
        warmup = min(int(base.get("warmup_iters", 0)), steps // 10)
        train_cfg = build_config(
            TrainConfig,
            {**base, "max_iters": steps, "lr_decay_iters": steps, "warmup_iters": warmup},
        )
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg)
        batches = clm_batches(model_cfg, train_ids, val_ids, train_cfg)
        return Trainer(model, *batches, train_cfg, loss_fn=clm_loss(model_cfg))

    if cfg.max_steps is not None:
        planned = cfg.max_steps
    else:  # a few timed steps say how many the budget holds; the schedule decays over those
        probe = trainer_for(10**6)
        probe.train_step()  # the first step pays for one-off allocations
        tick = time.perf_counter()
        for _ in range(3):
            probe.train_step()
        planned = max(10, int(cfg.budget_seconds * 3 / (time.perf_counter() - tick)))
        del probe
    trainer = trainer_for(planned)
    params = sum(p.numel() for p in {id(p): p for p in trainer.model.parameters()}.values())
    log(f"{name}: {params / 1e6:.2f}M parameters, ~{planned} steps in {cfg.budget_seconds:g} s")

    curve: list[tuple[float, float]] = []
    spent, steps, next_point = 0.0, 0, cfg.budget_seconds / cfg.curve_points
    while spent < cfg.budget_seconds and steps < planned:
        tick = time.perf_counter()
        trainer.train_step()
        spent += time.perf_counter() - tick
        steps += 1
        if spent >= next_point:
            curve.append((spent, trainer.evaluate()["val_loss"]))
            next_point += cfg.budget_seconds / cfg.curve_points
    c = trainer.train_batches
    tokens = steps * c.batch_size * c.block_size
    model = trainer.model.eval()
    if family_of_config(model_cfg).name == "rnn":
        final = evaluate_streams(model, val_ids, model_cfg.block_size)
    else:
        final = evaluate_tokens(model, val_ids, model_cfg.block_size)
    curve.append((spent, final["loss"]))
    return CompareRow(
        model=name,
        kind=kind,
        params=params,
        train_s=spent,
        steps=steps,
        tokens_per_s=tokens / max(spent, 1e-9),
        val_loss=final["loss"],
        sample=_sample_text(model, tokenizer, cfg.sample_chars, cfg.seed),
        curve=curve,
    )


def compare_models(cfg: CompareConfig, log: Callable[[str], None] = print) -> list[CompareRow]:
    """Every model of ``cfg.models`` on the same characters, split and budget, in order."""
    from lmarch.tokenizers.kinds import build_tokenizer

    train, val = read_splits(cfg.data, cfg.val_chars)
    tokenizer = build_tokenizer("char", train, val, 0)
    train_ids = torch.tensor(tokenizer.encode(train), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val), dtype=torch.long)
    log(
        f"{cfg.data}: {len(train):,} train / {len(val):,} validation characters, "
        f"{tokenizer.vocab_size} symbols, {cfg.budget_seconds:g} s per model"
    )
    rows = []
    for name in cfg.models:
        if name == "ngram":
            rows.append(run_ngram(cfg, train, val))
        else:
            rows.append(run_neural(name, cfg, tokenizer, train_ids, val_ids, log))
        r = rows[-1]
        log(f"{name}: val {r.val_loss:.4f} nats/char ({r.bits_per_char:.3f} bits), {r.steps} steps")
    return rows


# the order the histories expect at equal budget, best last
EXPECTED_ORDER = (("ngram",), ("rnn",), ("lstm", "gru"), ("gpt", "llama"))


def ordering_verdict(rows: Sequence[CompareRow]) -> str:
    """One sentence on whether the measured validation losses follow the expected order
    n-gram > RNN > LSTM / GRU > transformer (only the generations present are compared), and
    where they do not."""
    loss = {r.model: r.val_loss for r in rows}
    tiers = [[m for m in tier if m in loss] for tier in EXPECTED_ORDER]
    tiers = [t for t in tiers if t]
    broken = [
        f"{a} ({loss[a]:.3f}) <= {b} ({loss[b]:.3f})"
        for earlier, later in zip(tiers, tiers[1:])
        for a in earlier
        for b in later
        if loss[a] <= loss[b]
    ]
    expected = " > ".join("/".join(t) for t in tiers)
    if len(tiers) < 2:
        return "fewer than two generations compared: no order to check"
    if not broken:
        return f"validation loss follows the expected order {expected}"
    return f"the expected order {expected} does not hold: " + "; ".join(broken)


def plot_curves(rows: Sequence[CompareRow], path: str | Path, title: str = "") -> Path:
    """Validation loss against training seconds, one line per model (the n-gram model a point
    at its counting time), saved as a PNG."""
    from lmarch.analysis.plots import plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in rows:
        xs, ys = zip(*r.curve) if r.curve else ((), ())
        style = "o" if len(xs) == 1 else "-"
        ax.plot(xs, ys, style, label=f"{r.model} ({r.params / 1e6:.2f}M)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(title or "same text, same characters, same budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
