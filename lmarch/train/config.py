"""Training hyper-parameters. Names follow nanoGPT where they overlap, so its users feel at home."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmarch.errors import LmarchError


@dataclass
class TrainConfig:
    """Everything the Trainer needs besides the model and the data."""

    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: decay over max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int | None = None  # None: at every eval
    dtype: str = "float32"  # "bfloat16" trains under bf16 autocast
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    val_fraction: float = 0.1
    skip_nonfinite: bool = False  # skip a step whose loss is nan/inf instead of stopping

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise LmarchError(f"dtype must be 'float32' or 'bfloat16', not {self.dtype!r}")
        positive = ["batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval"]
        for name in positive + ["gradient_accumulation_steps"]:
            if getattr(self, name) < 1:
                raise LmarchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise LmarchError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def decay_iters(self) -> int:
        """Iterations over which the learning rate decays to ``min_lr``."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters


def field_names(cls: type) -> set[str]:
    """Names of a dataclass's fields."""
    return {f.name for f in dataclasses.fields(cls)}


def coerce_value(cls: type, key: str, raw: str) -> Any:
    """Parse the string ``raw`` as the type of field ``key`` of dataclass ``cls`` (for --set)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[key]
    kind = str(field.type)
    text = raw.strip()
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind.startswith("int"):
            return int(float(text)) if "e" in text.lower() else int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise LmarchError(f"bad value {raw!r} for {key} (expected {kind})") from None
    return text
