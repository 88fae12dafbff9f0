"""The training loop: mini-batch AdamW on a loss, with everything a real run needs around it.

Per iteration: for each of ``gradient_accumulation_steps`` micro-batches, loss / steps is
back-propagated; gradients are clipped to global norm ``grad_clip`` (Pascanu et al. 2013); the
learning rate is set from the schedule; AdamW steps. Options: ``precision`` bf16 (autocast) or
fp16 (autocast with dynamic loss scaling, Micikevicius et al. 2018: the loss is multiplied by S
before the backward, gradients divided by S before clipping, a step with inf/nan gradients is
skipped and S halved, S doubled after 2000 clean steps), and ``grad_checkpointing``
(:mod:`lmarch.train.checkpointing`). Around that: periodic evaluation, JSONL metrics, callbacks
(progress bar, plots), atomic checkpoints and bit-identical resume (loss scale included).

``strategy`` ``ddp`` or ``fsdp`` (:mod:`lmarch.train.parallelize`, applied from outside the model)
runs the same loop on every rank of a process group: each rank takes its slice of the global
batch (:class:`~lmarch.data.batches.RankSlice`), losses are averaged over ranks before they are
logged, only rank 0 logs, calls callbacks and writes files, and FSDP writes sharded checkpoints
(:mod:`lmarch.train.sharded_checkpoint`). Native fast paths are not swapped in then.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.data.batches import RandomBlockSampler, RankSlice
from lmarch.errors import LmarchError
from lmarch.native import accelerate
from lmarch.train.checkpointing import checkpoint_blocks
from lmarch.train.config import TrainConfig
from lmarch.train.distributed import (
    DistInfo,
    all_reduce_mean,
    device_for,
    dist_info,
    init_distributed,
)
from lmarch.train.optim import build_optimizer, learning_rate_at
from lmarch.train.parallelize import (
    check_strategy,
    clip_grad_norm,
    gradient_sync,
    parallelize,
    reduce_partial_grads,
    tp_checkpoint_tensors,
    tp_load_checkpoint_tensors,
    tp_optimizer,
)
from lmarch.train.sharded_checkpoint import find_sharded_checkpoint, load_sharded, save_sharded
from lmarch.train.state import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_from_tensors,
    rng_to_tensors,
)
from lmarch.weights.checkpoint import find_checkpoint, read_json, write_checkpoint, write_json
from lmarch.weights.run_log import append_metrics
from lmarch.weights.safetensors_io import (
    load_into_model,
    load_tensors,
    save_tensors,
    unique_state_dict,
)

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


def causal_lm_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Mean next-token cross-entropy: -1/N sum_t log p(x_{t+1} | x_<=t)."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class NonFiniteLossError(LmarchError):
    """The loss became nan or inf."""


class Callback:
    """Hooks the Trainer calls; override the ones you need. ``metrics`` are plain dicts."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_log(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_eval(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    """What a finished run reports (``--json`` prints it)."""

    iters: int
    train_loss: float
    val_loss: float
    tokens_per_s: float

    def as_dict(self) -> dict[str, float]:
        return {
            "iters": self.iters,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_perplexity": math.exp(min(self.val_loss, 50.0)),
            "tokens_per_s": self.tokens_per_s,
        }


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, refusing what the device lacks."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise LmarchError(
            f"precision fp16 needs a CUDA device (its loss scaling is for GPUs), not {device}",
            hint="use precision=bf16 on the CPU",
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LmarchError(
            f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}",
            hint="use precision=fp16 (with loss scaling) on this GPU",
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains ``model`` on batches from ``train_batches``; evaluates on ``val_batches``.

    ``out_dir`` (optional) receives checkpoints and ``metrics.jsonl``. The loss function maps
    (model, batch) to a scalar, so other objectives (masked LM, classification) reuse the loop.
    """

    def __init__(
        self,
        model: nn.Module,
        train_batches: RandomBlockSampler,
        val_batches: RandomBlockSampler,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        loss_fn: LossFn = causal_lm_loss,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        self.distributed = config.strategy != "single"
        self.dist = dist_info() if self.distributed else DistInfo()
        if self.distributed:
            # refusals come before any rendezvous
            check_strategy(config.strategy, model, self.dist.world_size)
            if config.strategy != "tp":  # tensor parallel: every rank sees the whole batch
                train_batches = _rank_slice(train_batches, self.dist)
                val_batches = _rank_slice(val_batches, self.dist)
            self.device = device_for(config.device, self.dist)
            self.dist = init_distributed(self.device)
            self.model = model.to(self.device)  # the reference blocks (lmarch.train.parallelize)
        else:
            if dist_info().world_size > 1:  # N copies of one run would race on one folder
                raise LmarchError(
                    f"{dist_info().world_size} ranks were started for strategy 'single'",
                    hint="add --strategy ddp, fsdp or tp",
                )
            self.device = resolve_device(config.device)
            self.model = accelerate(model.to(self.device), training=True)  # native fast paths
        self.autocast_dtype = _autocast_dtype(config.precision, self.device)
        if config.strategy == "fsdp":
            self.autocast_dtype = None  # FSDP's mixed-precision policy casts instead
        # fp16's narrow range needs loss scaling; bf16 has float32's exponent range and does not
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        if config.grad_checkpointing and checkpoint_blocks(self.model) == 0:
            raise LmarchError(
                f"grad_checkpointing: {type(model).__name__} has no Transformer block to checkpoint",
                hint="drop --set grad_checkpointing=true for this model",
            )
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loss_fn = loss_fn
        self.callbacks = list(callbacks) if self.dist.is_main else []  # other ranks stay silent
        self.model, self._parallel_model = parallelize(
            self.model, config.strategy, self.device, config.precision
        )
        if self.dist.rank > 0:
            torch.manual_seed(config.seed + self.dist.rank)  # dropout masks differ per rank
        self.optimizer = build_optimizer(self.model, config)
        if config.strategy == "tp":
            # the un-split optimizer names the parameters as one process does (checkpoints); the
            # split one steps (one kind of tensor per group), and both share one state
            self._whole_optimizer = self.optimizer
            self.optimizer = tp_optimizer(self.optimizer)
            self._whole_optimizer.state = self.optimizer.state
        self.step = 0
        self.tokens_per_s = 0.0
        self.last_train_loss = float("nan")
        self.last_val_loss = float("nan")
        self._forward_model = self._parallel_model
        if config.compile:
            self._forward_model = torch.compile(self._parallel_model)

    # ---- pieces of one iteration ----------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _to_device(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def train_step(self) -> Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the
        mean loss as a tensor (not synchronised to the host)."""
        cfg = self.config
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(self.step, cfg)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.gradient_accumulation_steps):
            batch = self._to_device(self.train_batches.sample())
            # ranks average gradients on the last micro-batch only
            last = micro == cfg.gradient_accumulation_steps - 1
            with gradient_sync(self._parallel_model, last), self._autocast():
                loss = self.loss_fn(self._forward_model, batch) / cfg.gradient_accumulation_steps
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total += loss.detach()
        if cfg.skip_nonfinite and self.distributed:
            total = all_reduce_mean(total)  # every rank skips the same steps
        if cfg.skip_nonfinite and not torch.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            return total
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if cfg.strategy == "tp":  # sequence-parallel norms' gradients arrive partial
            reduce_partial_grads(list(self.model.parameters()))
        if cfg.grad_clip > 0 and cfg.strategy == "tp":
            clip_grad_norm(list(self.model.parameters()), cfg.grad_clip)  # shards + whole ones
        elif cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/nan
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self, iters: int | None = None) -> dict[str, float]:
        """Mean loss over ``eval_iters`` batches of each split. The batches come from a generator
        seeded afresh each time, so every evaluation sees the same batches and the training
        order is not disturbed."""
        iters = iters or self.config.eval_iters
        self.model.eval()
        out = {}
        for split, sampler in (("train", self.train_batches), ("val", self.val_batches)):
            gen = torch.Generator().manual_seed(self.config.seed + 1)
            losses = torch.zeros(iters)
            for i in range(iters):
                batch = self._to_device(sampler.sample(generator=gen))
                with self._autocast():
                    losses[i] = self.loss_fn(self._forward_model, batch).float()
            out[f"{split}_loss"] = all_reduce_mean(losses.mean()).item()
        self.model.train()
        return out

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write model, optimizer and RNG state for the current step (atomically)."""
        if self.out_dir is None:
            return
        if self.config.strategy == "fsdp":
            self._save_sharded()
            return
        weights = None
        if self.config.strategy == "tp":  # every rank gathers, rank 0 writes the whole model
            weights, optim_tensors, optim_meta = tp_checkpoint_tensors(
                self.model, self._whole_optimizer
            )
        if not self.dist.is_main:
            return  # DDP's replicas are equal: rank 0 writes the one copy
        if weights is None:
            weights = unique_state_dict(self.model)
            optim_tensors, optim_meta = optimizer_to_tensors(self.optimizer)
        rng = rng_to_tensors({"train_batches": self.train_batches.generator})
        # a sampler that walks its text in order (TBPTT streams) also saves where it is
        if hasattr(self.train_batches, "position_tensors"):
            rng.update(self.train_batches.position_tensors())
        meta = {"step": self.step, "optimizer": optim_meta}
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()  # the loss scale and its growth counter
        write_checkpoint(
            self.out_dir,
            {
                "model.safetensors": lambda p: save_tensors(weights, p),
                "trainer.safetensors": lambda p: save_tensors({**optim_tensors, **rng}, p),
                "trainer.json": lambda p: write_json(p, meta),
            },
        )

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint of ``out_dir``; False when there is none."""
        ckpt = find_checkpoint(self.out_dir) if self.out_dir is not None else None
        sharded = find_sharded_checkpoint(self.out_dir) if self.out_dir is not None else None
        if sharded is not None and (ckpt is None or sharded.name == "checkpoint"):
            if self.config.strategy == "tp":
                raise LmarchError(
                    f"{sharded} is a sharded (fsdp) checkpoint; --strategy tp resumes the "
                    "single-process layout",
                    hint="lmarch consolidate the run first, or resume it with fsdp",
                )
            self._load_sharded(sharded)
            return True
        if ckpt is None:
            return False
        if self.config.strategy == "fsdp":
            raise LmarchError(
                f"{ckpt} is a single-process checkpoint; --strategy fsdp resumes sharded ones",
                hint="resume it with --strategy ddp (or single)",
            )
        meta = read_json(ckpt / "trainer.json")
        state = load_tensors(ckpt / "trainer.safetensors")
        weights = load_tensors(ckpt / "model.safetensors")
        if self.config.strategy == "tp":
            whole = self._whole_optimizer
            tp_load_checkpoint_tensors(self.model, whole, weights, state, meta["optimizer"])
            self.optimizer.state = whole.state
        else:
            load_into_model(self.model, weights, str(ckpt))
            optimizer_from_tensors(self.optimizer, state, meta["optimizer"])
        rng_from_tensors(state, {"train_batches": self.train_batches.generator})
        if hasattr(self.train_batches, "load_position_tensors"):
            self.train_batches.load_position_tensors(state)
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self._reseed_rank()
        return True

    def _trainer_tensors(self) -> dict[str, Tensor]:
        rng = rng_to_tensors({"train_batches": self.train_batches.generator})
        if hasattr(self.train_batches, "position_tensors"):
            rng.update(self.train_batches.position_tensors())
        return rng

    def _save_sharded(self) -> None:
        meta = {"step": self.step, "strategy": self.config.strategy}
        meta["world_size"] = self.dist.world_size
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()
        save_sharded(self.out_dir, self.model, self.optimizer, meta, self._trainer_tensors())

    def _load_sharded(self, ckpt: Path) -> None:
        meta, state = load_sharded(ckpt, self.model, self.optimizer)
        rng_from_tensors(state, {"train_batches": self.train_batches.generator})
        if hasattr(self.train_batches, "load_position_tensors"):
            self.train_batches.load_position_tensors(state)
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self._reseed_rank()

    def _reseed_rank(self) -> None:
        # the checkpoint holds rank 0's generator; the others continue on streams of their own
        if self.dist.rank > 0:
            torch.manual_seed(self.config.seed + self.dist.rank + 1_000_003 * self.step)

    # ---- the loop ---------------------------------------------------------------------------

    def _log(self, row: dict) -> None:
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            append_metrics(self.out_dir / "metrics.jsonl", row)  # one whole line per write

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss) and not self.config.skip_nonfinite:
            raise NonFiniteLossError(
                f"loss became {loss} at iteration {self.step}; the last good checkpoint is kept",
                hint="lower learning_rate, enable grad_clip, or --set skip_nonfinite=true",
            )

    def fit(self, resume: bool = False, until: int | None = None) -> TrainResult:
        """Train to ``max_iters`` (or stop early at iteration ``until``), then evaluate and save.

        With ``resume`` the latest checkpoint in ``out_dir`` is restored first, and training
        continues with the same data order, schedule and random state.
        """
        cfg = self.config
        if resume and not self.load_checkpoint():
            raise LmarchError(f"nothing to resume in {self.out_dir}", hint="drop --resume")
        stop = min(until or cfg.max_iters, cfg.max_iters)
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        tokens_per_iter = self.train_batches.batch_size * self.train_batches.block_size
        tokens_per_iter *= cfg.gradient_accumulation_steps
        for cb in self.callbacks:
            cb.on_train_start(self)
        window_start, window_steps = time.perf_counter(), 0
        interrupted = False
        try:
            while self.step < stop:
                loss = self.train_step()
                window_steps += 1
                at_end = self.step == stop
                if self.step % cfg.log_interval == 0 or at_end:
                    value = all_reduce_mean(loss).item()  # the global batch's loss
                    self._check_finite(value)
                    elapsed = time.perf_counter() - window_start
                    self.tokens_per_s = window_steps * tokens_per_iter / max(elapsed, 1e-9)
                    self.last_train_loss = value
                    row = {
                        "iter": self.step,
                        "loss": value,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "tokens_per_s": self.tokens_per_s,
                    }
                    self._log(row)
                    for cb in self.callbacks:
                        cb.on_log(self, row)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.eval_interval == 0 and not at_end:
                    self._run_eval()
                if self.step % ckpt_every == 0 and not at_end:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True
        if not interrupted:
            self._run_eval()
        self.save_checkpoint()
        result = TrainResult(self.step, self.last_train_loss, self.last_val_loss, self.tokens_per_s)
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        if interrupted:
            raise KeyboardInterrupt
        return result

    def release(self) -> None:
        """Drop the parallel wrapper (DDP's reducer holds the process group): call it before the
        group is destroyed, or the reducer's late destruction can wait forever on gloo's threads."""
        self._parallel_model = self._forward_model = self.model

    def _run_eval(self) -> None:
        metrics = self.evaluate()
        self._check_finite(metrics["val_loss"])
        self.last_val_loss = metrics["val_loss"]
        row = {
            "iter": self.step,
            **metrics,
            "val_perplexity": math.exp(min(metrics["val_loss"], 50)),
        }
        self._log(row)
        for cb in self.callbacks:
            cb.on_eval(self, row)


def _rank_slice(sampler, info: DistInfo):
    """``sampler`` cut to this rank's slice; a batch the ranks cannot share equally is refused."""
    try:
        return RankSlice(sampler, info.rank, info.world_size)
    except ValueError as exc:
        raise LmarchError(
            f"{exc} (global batch_size {sampler.batch_size}, {info.world_size} ranks)",
            hint=f"set batch_size to a multiple of {info.world_size}",
        ) from None
