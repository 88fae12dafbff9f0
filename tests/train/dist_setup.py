"""The tiny model, data and settings shared by tests/train/test_distributed.py and the ranks it
starts (tests/train/dist_worker.py): every process builds them the same way from the same seeds."""

from __future__ import annotations

import torch

from lmarch.data.batches import RandomBlockSampler
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.train.config import TrainConfig

BLOCK = 16


def make_model() -> GPT:
    """A 2-layer, 32-wide GPT over 65 symbols, seeded (every rank builds the same weights).

    Without biases: the key bias's true gradient is zero (softmax ignores a shift common to a
    row's scores), so what it gets is rounding noise (~1e-13), which AdamW's normalised update
    turns into lr-sized steps that differ with any change in summation order."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, bias=False)
    return GPT(config)


def make_samplers(batch_size: int = 4) -> tuple[RandomBlockSampler, RandomBlockSampler]:
    """Train / val samplers over a fixed random token stream (the same on every rank)."""
    tokens = torch.randint(65, (3000,), generator=torch.Generator().manual_seed(1))
    return (
        RandomBlockSampler(tokens[:2500], BLOCK, batch_size, seed=5),
        RandomBlockSampler(tokens[2500:], BLOCK, batch_size, seed=6),
    )


def train_config(**over) -> TrainConfig:
    """8 iterations on a fixed schedule (decay over 8 whatever ``until`` stops at), no dropout,
    a checkpoint only at the end of each ``fit``."""
    base = dict(
        batch_size=4,
        max_iters=8,
        lr_decay_iters=8,
        warmup_iters=2,
        learning_rate=1e-2,
        eval_interval=100,
        eval_iters=1,
        log_interval=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **over})


# (name, preset, overrides) of the tensor-parallel checks: 4 query heads over 2 ranks; LLaMA with
# 2 key/value heads (grouped-query), RoPE and SwiGLU
TP_MODELS = [
    ("gpt", "gpt-char-tiny", {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}),
    (
        "llama",
        "llama-tiny",
        {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 64},
    ),
]
