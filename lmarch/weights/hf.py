"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.weights.safetensors_io import atomic_write, load_tensors, save_tensors


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LmarchError(
            f"no config.json in {folder}", hint="is this a Hugging Face model folder?"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"{path} is not valid JSON: {exc}") from exc


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of the folder: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_tensors(single)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise LmarchError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmarchError(f"{index} is not a valid safetensors index: {exc}") from exc
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_tensors(folder / shard))
    return tensors


def write_hf_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write config.json and model.safetensors (``format: pt`` metadata, as transformers expects)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
