"""Weights on disk as safetensors, written atomically, with tied parameters stored once."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmarch.errors import LmarchError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash mid-write leaves the previous file untouched: readers see the old or the new
    version, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created like a plain open() would (umask applies), unlike mkstemp's 0600
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without aliases: a tensor shared by several names (tied
    embeddings) is kept under the first name only. Tensors are made contiguous for saving."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_tensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file; a missing or malformed file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise LmarchError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LmarchError(f"cannot read safetensors file {path}: {exc}") from exc


def load_into_model(
    model: nn.Module, tensors: dict[str, Tensor], source: str = "weights", assign: bool = False
) -> None:
    """Load ``tensors`` into ``model``; only names that alias another parameter may be missing.

    Shapes and names are checked up front so a mismatch names the offending tensor. With
    ``assign`` the tensors become the parameters (no copy: for models built on the meta device);
    tied parameters are tied again afterwards.
    """
    expected = model.state_dict()
    first_name: dict[int, str] = {}
    alias_of: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            alias_of[name] = first_name[id(param)]  # a second name for a tied parameter
        else:
            first_name[id(param)] = name
    missing = set(expected) - set(tensors) - set(alias_of)
    unexpected = set(tensors) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)[:5]}")
        if unexpected:
            parts.append(f"unexpected {sorted(unexpected)[:5]}")
        raise LmarchError(f"{source} do not fit the model: {'; '.join(parts)}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise LmarchError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False, assign=assign)
    if assign:
        for alias, name in alias_of.items():
            owner, _, attr = alias.rpartition(".")
            src_owner, _, src_attr = name.rpartition(".")
            setattr(
                model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr)
            )
