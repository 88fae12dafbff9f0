"""Weight initialisation shared by the GPT-style families, and building models without it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2's scheme (Radford et al. 2019): Linear and Embedding weights ~ N(0, 0.02^2), biases 0.

    Use as ``model.apply(init_normal)``.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


def _leave(tensor: Tensor, *args: object, **kwargs: object) -> Tensor:
    return tensor


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules without weights: on the meta device, with ``torch.nn.init`` switched off.

    For models whose weights are about to be loaded from a file. Without this, layers such as
    ``nn.Embedding`` still run their random initialisation on meta tensors, which routes
    through PyTorch's reference kernels and imports its compiler stack (1.5 s here).
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _leave)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
