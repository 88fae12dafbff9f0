"""Position-wise feed-forward networks.

MLP (Vaswani et al. 2017, sec. 3.3): FFN(x) = act(x W1 + b1) W2 + b2, hidden width usually 4d.
Gated units (Shazeer 2020, "GLU Variants Improve Transformer"):
    SwiGLU(x) = (SiLU(x W_gate) * (x W_up)) W_down,  GeGLU uses GELU in place of SiLU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation used by GPT-2 and BERT's TF code (Hendrycks & Gimpel 2016):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    (:func:`lmarch.native.accelerate` swaps in a native kernel for large float32 CPU tensors.)"""
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: Tensor) -> Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with (Hendrycks &
    Gimpel 2016, sec. 2): x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """Look up an activation by name (``gelu``, ``gelu_tanh``, ``relu``, ``silu``, ``tanh``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Two-layer feed-forward block: ``fc_out(dropout?(act(fc_in(x))))``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)
        self.act = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc_out(self.act(self.fc_in(x)))
        return self.dropout(y) if self.training else y


class GatedMLP(nn.Module):
    """Gated linear unit feed-forward (SwiGLU with ``activation="silu"``, GeGLU with ``"gelu"``).

    The gate and up projections are one fused matrix ``gate_up`` of shape [2*hidden, dim]:
    the first half of its rows is W_gate, the second half W_up.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "silu",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        y = self.down(self.act(gate) * up)
        return self.dropout(y) if self.training else y


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """LLaMA's hidden width for SwiGLU: 2/3 of 4d (to keep the parameter count of a 4d MLP),
    scaled, then rounded up to a multiple of ``multiple_of`` (Touvron et al. 2023)."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


__all__ = ["MLP", "GatedMLP", "gelu_tanh", "get_activation", "quick_gelu", "swiglu_hidden_dim"]
