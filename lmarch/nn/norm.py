"""Normalisation layers.

LayerNorm (Ba et al. 2016): y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, over the last dim.
RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * gamma — no centring, no bias.
Gemma stores RMSNorm's gain as an offset from one: y = x / sqrt(mean(x^2) + eps) * (1 + w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one; some later models drop it)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        # F.layer_norm computes exactly the equation above in one fused kernel.
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation, computed in float32 for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm evaluates x / sqrt(mean(x^2) + eps) in float32 for half-precision inputs
        # and rounds once, in one call: written out (cast, pow, mean, add, rsqrt, mul, cast) the
        # dispatch of those tiny operations dominated a decoding step of a 135M model. The gain
        # is applied after the rounding, as LLaMA's reference does, so bf16 results match it.
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose stored gain is an offset from one (Gemma 1/2/3, Gemma Team 2024):
    y = x / sqrt(mean(x^2) + eps) * (1 + w), with w initialised to zeros.

    The whole product is computed in float32 and rounded once, as Gemma's reference does (it
    differs from :class:`RMSNorm` there, which rounds before applying the gain)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """Factory used by model configs: ``kind`` is ``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'layernorm' or 'rmsnorm'")
