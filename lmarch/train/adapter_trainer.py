"""A Trainer for a model whose base is frozen: its checkpoints hold only what trains.

Fine-tuning LoRA adapters (:mod:`lmarch.peft`) on SmolLM2-135M trains ~0.5% of the parameters;
writing the frozen 540 MB base into every checkpoint would cost more time and disk than the
training itself, and the base is loaded from where it came from anyway. So the checkpoint's
``model.safetensors`` holds only the parameters with ``requires_grad`` (by their names in the
model), beside the optimizer and random-generator state exactly as :class:`Trainer` writes them,
and resume is as bit-identical as for a full run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.train.state import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_from_tensors,
    rng_to_tensors,
)
from lmarch.train.trainer import Trainer
from lmarch.weights.checkpoint import find_checkpoint, read_json, write_checkpoint, write_json
from lmarch.weights.safetensors_io import load_tensors, save_tensors


def trainable_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``model`` that train (``requires_grad``), by name, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class AdapterTrainer(Trainer):
    """:class:`Trainer` whose checkpoints hold the trainable parameters only. ``on_save(model)``
    (optional) runs after each checkpoint is in place, e.g. to write the adapter in another
    format beside it."""

    def __init__(
        self, *args: Any, on_save: Callable[[nn.Module], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_save = on_save

    def save_checkpoint(self) -> None:
        """Write the trainable parameters, optimizer and RNG state (atomically)."""
        if self.out_dir is None or not self.dist.is_main:
            return  # DDP's replicas are equal: rank 0 writes the one copy
        optim_tensors, optim_meta = optimizer_to_tensors(self.optimizer)
        rng = rng_to_tensors({"train_batches": self.train_batches.generator})
        meta = {"step": self.step, "optimizer": optim_meta, "trainable_only": True}
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()  # fp16's loss scale, as Trainer keeps it
        weights = trainable_tensors(self.model)
        write_checkpoint(
            self.out_dir,
            {
                "model.safetensors": lambda p: save_tensors(weights, p),
                "trainer.safetensors": lambda p: save_tensors({**optim_tensors, **rng}, p),
                "trainer.json": lambda p: write_json(p, meta),
            },
        )
        if self.on_save is not None:
            self.on_save(self.model)

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint of ``out_dir`` (refused when its tensors are not
        exactly this model's trainable parameters); False when there is none."""
        ckpt = find_checkpoint(self.out_dir) if self.out_dir is not None else None
        if ckpt is None:
            return False
        saved = load_tensors(ckpt / "model.safetensors")
        params = dict(self.model.named_parameters())
        want = {n for n, p in params.items() if p.requires_grad}
        if set(saved) != want:
            extra, missing = sorted(set(saved) - want), sorted(want - set(saved))
            raise LmarchError(
                f"{ckpt} does not hold this model's trainable parameters "
                f"(missing {missing[:3]}, unexpected {extra[:3]})",
                hint="resume with the settings the run was started with",
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                if tensor.shape != params[name].shape:
                    raise LmarchError(
                        f"{ckpt}: {name} has shape {tuple(tensor.shape)}, the model's is "
                        f"{tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
        meta = read_json(ckpt / "trainer.json")
        state = load_tensors(ckpt / "trainer.safetensors")
        optimizer_from_tensors(self.optimizer, state, meta["optimizer"])
        rng_from_tensors(state, {"train_batches": self.train_batches.generator})
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        return True
