"""Absolute position encodings.

Learned (GPT-2, BERT): a trainable table P in R^{T_max x d}, added to token embeddings.
Sinusoidal (Vaswani et al. 2017, sec. 3.5):
    PE(pos, 2i) = sin(pos / 10000^(2i/d)),   PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LearnedPositionalEmbedding(nn.Embedding):
    """A learned table of ``max_positions`` position vectors, looked up by absolute position."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__(max_positions, dim)

    def forward(self, positions: Tensor) -> Tensor:  # noqa: D102 - see class docstring
        return super().forward(positions)


def sinusoidal_table(max_positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed [max_positions, dim] sinusoid table; even columns sin, odd columns cos."""
    positions = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions * inv_freq
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal encodings, stored as a non-persistent buffer (nothing to learn or save)."""

    def __init__(self, max_positions: int, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_positions, dim, base), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]
