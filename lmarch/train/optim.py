"""AdamW with decoupled weight decay and the warmup + cosine learning-rate schedule.

AdamW (Loshchilov & Hutter 2019): Adam's update, plus theta <- theta - lr * lambda * theta applied
directly to the weights rather than through the gradient. Decay is for the matrices that mix
features; norms' gains, biases and embedding tables are left undecayed.

Schedule (as in GPT-3 and nanoGPT): linear warmup to the peak rate over ``warmup_iters``, then a
cosine from the peak down to ``min_lr`` at ``lr_decay_iters``, flat afterwards:
    lr(t) = min_lr + 0.5 (1 + cos(pi * (t - warmup) / (decay - warmup))) (lr_max - min_lr).

The original Transformer's schedule (Vaswani et al. 2017, eq. 3), :func:`transformer_lr`:
    lr(n) = d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)
(linear growth for ``warmup`` steps, then decay with the inverse square root of the step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmarch.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (Linear weights) and an undecayed one (the rest)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.dim() >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, fused where this PyTorch supports it for the device."""
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        fused=fused,
    )


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """The scheduled learning rate for iteration ``step`` (0-based): warmup + cosine, or with
    ``lr_schedule="inverse_sqrt"`` :func:`transformer_lr` scaled to peak at ``learning_rate``."""
    if config.lr_schedule == "inverse_sqrt":
        warmup = max(1, config.warmup_iters)
        return transformer_lr(step, 1, warmup, config.learning_rate * warmup**0.5)
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    decay = config.decay_iters
    if step > decay:
        return config.min_lr
    span = max(1, decay - config.warmup_iters)
    ratio = (step - config.warmup_iters) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def transformer_lr(step: int, d_model: int, warmup: int = 4000, scale: float = 1.0) -> float:
    """Vaswani et al. 2017, eq. 3: ``scale * d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)`` for
    the 1-based step number n = ``step`` + 1 (``step`` counts from 0, as the Trainer's does);
    the peak, d_model^-0.5 * warmup^-0.5, is reached at n = warmup."""
    if d_model < 1 or warmup < 1:
        raise ValueError(f"d_model and warmup must be >= 1, got {d_model} and {warmup}")
    n = step + 1
    return scale * d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)
