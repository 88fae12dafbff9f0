"""Write a model as an lmarch run folder, so that every command can load it.

``lmarch quantize``, ``lmarch merge`` and ``lmarch finetune`` all produce a model that is not a
training run of ours but should load like one. They write the same layout ``lmarch train`` does
(see :mod:`lmarch.weights.checkpoint`):

    DIR/checkpoint/model.safetensors   the model's state dict (tied tensors once)
    DIR/tokenizer.json                 the tokenizer
    DIR/config.json                    the run config: "model" (with its family), "objective",
                                       and whatever else the writer adds ("chat", "quant", ...)

``config.json`` is written last: a folder is recognised as a run by it, so a write cut short
leaves a folder no reader mistakes for a finished model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lmarch.tokenizers.base import Tokenizer
from lmarch.weights.checkpoint import write_checkpoint, write_json
from lmarch.weights.safetensors_io import save_tensors, unique_state_dict

__all__ = ["write_model_folder"]


def write_model_folder(
    out: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    run_config: dict[str, Any],
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` (or the given ``tensors`` in its place), ``tokenizer`` and ``run_config``
    to ``out`` as a run folder; returns ``out``. ``run_config`` must hold ``"model"`` (a
    :func:`~lmarch.models.registry.config_to_dict` dict)."""
    if "model" not in run_config or "family" not in run_config["model"]:
        raise ValueError("run_config needs a 'model' entry made by config_to_dict")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = unique_state_dict(model) if tensors is None else tensors
    write_checkpoint(out, {"model.safetensors": lambda p: save_tensors(weights, p)})
    tokenizer.save(out / "tokenizer.json")
    write_json(out / "config.json", run_config)
    return out
