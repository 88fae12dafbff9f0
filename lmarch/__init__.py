"""lmarch: language-model architectures from scratch in PyTorch.

Each family is written out from its paper, verified against a reference implementation,
and can be trained, sampled, inspected and loaded with real weights.

``lmarch.load(spec, ...)`` loads any model (see :mod:`lmarch.loading`); it is imported on first
use, so ``import lmarch`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_LAZY = {"load", "LoadedModel", "ChatConvention", "Pooling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lmarch import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'lmarch' has no attribute {name!r}")


__all__ = ["ChatConvention", "LoadedModel", "Pooling", "__version__", "load"]
