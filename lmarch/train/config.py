"""Training hyper-parameters. Names follow nanoGPT where they overlap, so its users feel at home.

Each field carries its help text (:func:`lmarch.settings.setting`), which ``lmarch train
--help`` shows; :meth:`TrainConfig.__post_init__` refuses a value outside its range, naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmarch.errors import LmarchError
from lmarch.settings import coerce_value, field_names, setting

__all__ = [
    "LR_SCHEDULES",
    "PRECISIONS",
    "TrainConfig",
    "coerce_value",
    "field_names",
    "merge_saved_settings",
]

# Mixed precision: "fp32" none; "bf16" autocast to bfloat16 (CPU and CUDA; Kalamkar et al. 2019);
# "fp16" autocast to float16 with dynamic loss scaling (Micikevicius et al. 2018), CUDA only.
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "inverse_sqrt")  # lmarch.train.optim.learning_rate_at
# how the run spreads over processes (lmarch.train.parallelize)
STRATEGIES = ("single", "ddp", "fsdp", "tp")
# ``dtype`` is the older name of ``precision`` (run folders written before it carry it)
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class TrainConfig:
    """Everything the Trainer needs besides the model and the data."""

    batch_size: int = setting(12, "sequences per optimizer step (per accumulation micro-step)")
    max_iters: int = setting(2000, "training iterations (optimizer steps)")
    learning_rate: float = setting(1e-3, "peak learning rate (AdamW)")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(100, "iterations of linear warmup from 0 to learning_rate")
    lr_decay_iters: int | None = setting(None, "iterations of cosine decay; unset: max_iters")
    lr_schedule: str = setting(
        "cosine",
        "'cosine' (warmup, then cosine decay to min_lr) or 'inverse_sqrt' (Vaswani et al. 2017: "
        "warmup to learning_rate, then times sqrt(warmup_iters / step))",
    )
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay (matrices only)")
    beta1: float = setting(0.9, "AdamW's first-moment decay")
    beta2: float = setting(0.95, "AdamW's second-moment decay")
    grad_clip: float = setting(1.0, "clip the gradient's global norm to this; 0 disables")
    gradient_accumulation_steps: int = setting(1, "micro-batches summed per optimizer step")
    eval_interval: int = setting(250, "evaluate (and checkpoint) every this many iterations")
    eval_iters: int = setting(20, "batches per evaluation")
    log_interval: int = setting(10, "log the training loss every this many iterations")
    checkpoint_interval: int | None = setting(None, "checkpoint every N; unset: at every eval")
    precision: str = setting(
        "fp32", "'fp32', 'bf16' (autocast, CPU or CUDA) or 'fp16' (autocast + loss scaling, CUDA)"
    )
    dtype: str | None = setting(None, "old name of precision: 'float32' (fp32), 'bfloat16' (bf16)")
    grad_checkpointing: bool = setting(
        False, "recompute each Transformer block in the backward (less memory, one more forward)"
    )
    compile: bool = setting(False, "torch.compile the model")
    device: str = setting("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    seed: int = setting(1337, "seed of the initial weights and of the batch order")
    val_fraction: float = setting(0.1, "share of the text held out for validation")
    skip_nonfinite: bool = setting(False, "skip a step whose loss is nan/inf instead of stopping")
    strategy: str = setting(
        "single",
        "'single' (one process), 'ddp' (data parallel), 'fsdp' (FSDP2, sharded) or 'tp' "
        "(tensor parallel, GPT/LLaMA); several processes with torchrun or --nproc N "
        "(lmarch.train.parallelize)",
    )

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise LmarchError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def whole(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            need(ok, name, f"an integer >= {low}" + (" (or unset)" if optional else ""))

        def number(name: str) -> float:
            value = getattr(self, name)
            real = isinstance(value, (int, float)) and not isinstance(value, bool)
            return float(value) if real and math.isfinite(value) else math.nan

        for name in ("batch_size", "max_iters", "gradient_accumulation_steps"):
            whole(name, 1)
        for name in ("eval_interval", "eval_iters", "log_interval"):
            whole(name, 1)
        whole("warmup_iters", 0)
        whole("lr_decay_iters", 1, optional=True)
        whole("checkpoint_interval", 1, optional=True)
        need(number("learning_rate") > 0, "learning_rate", "a number > 0")
        need(number("min_lr") >= 0, "min_lr", "a number >= 0")
        need(number("weight_decay") >= 0, "weight_decay", "a number >= 0")
        need(0 <= number("beta1") < 1, "beta1", "in [0, 1)")
        need(0 <= number("beta2") < 1, "beta2", "in [0, 1)")
        need(number("grad_clip") >= 0, "grad_clip", "a number >= 0 (0 disables clipping)")
        need(0 < number("val_fraction") < 1, "val_fraction", "in (0, 1)")
        need(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {list(LR_SCHEDULES)}")
        need(self.strategy in STRATEGIES, "strategy", f"one of {list(STRATEGIES)}")
        if self.dtype is not None:
            need(self.dtype in DTYPES, "dtype", f"one of {list(DTYPES)} (or set precision)")
            folded = DTYPES[self.dtype]
            if self.precision not in ("fp32", folded):
                raise LmarchError(
                    f"TrainConfig.dtype={self.dtype!r} contradicts precision={self.precision!r}",
                    hint="set precision only (dtype is its old name)",
                )
            self.precision, self.dtype = folded, None  # one field holds the choice from here on
        if self.precision == "fp16" and str(self.device).startswith("cpu"):
            raise LmarchError(
                "precision fp16 needs a CUDA device (its loss scaling is for GPUs); "
                f"device is {self.device!r}",
                hint="use precision=bf16 on the CPU",
            )
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "an integer")
        for name in ("compile", "skip_nonfinite", "grad_checkpointing"):
            need(isinstance(getattr(self, name), bool), name, "true or false")

    @property
    def decay_iters(self) -> int:
        """Iterations over which the learning rate decays to ``min_lr``."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters


def merge_saved_settings(saved: dict, overrides: dict) -> dict:
    """A resumed run's saved training settings with ``overrides`` on top. ``dtype`` (a run
    folder's older name for ``precision``) and ``precision`` are one choice: the one given in
    ``overrides`` replaces the saved value under either name."""
    saved = dict(saved)
    if "precision" in overrides or "dtype" in overrides:
        saved.pop("precision", None)
        saved.pop("dtype", None)
    return {**saved, **overrides}
