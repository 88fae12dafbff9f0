"""Weight initialisation shared by the GPT-style families."""

from __future__ import annotations

from torch import nn


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2's scheme (Radford et al. 2019): Linear and Embedding weights ~ N(0, 0.02^2), biases 0.

    Use as ``model.apply(init_normal)``.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
