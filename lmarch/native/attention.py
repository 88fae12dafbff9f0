"""Causal self-attention over a packed ``qkv`` projection on lmarch's CPU kernel (``attention.c``).

``packed_causal_attention(qkv, H, H_kv, D)`` maps the output of a fused q/k/v projection,
[B, T, (H + 2 H_kv) D], to the attention output [B, T, H D] that the output projection reads:
softmax(q k^T / sqrt(D), causal) v per head, grouped-query when H_kv < H. It is a PyTorch operator
with its own backward (``lmarch::causal_attention``), so it trains, and ``torch.compile`` keeps
it as one opaque call. The forward saves the log-sum-exp of each row and the backward
recomputes the probabilities from it (FlashAttention's trick; memory O(B H T), not O(B H T^2)).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmarch.native import native_library


def attention_forward(
    qkv: Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """(y [B, T, H D], log-sum-exp [B, H, T]) for a contiguous float32 qkv [B, T, (H+2H_kv) D];
    with ``dropout`` > 0 the probabilities are dropped by the mask drawn from ``seed`` (the
    backward must get the same two)."""
    b, t, width = qkv.shape
    if (
        qkv.dtype != torch.float32
        or not qkv.is_cpu
        or not qkv.is_contiguous()
        or width != (heads + 2 * kv_heads) * head_dim
        or heads % kv_heads
        or head_dim % 16
    ):
        raise ValueError(
            f"causal_attention takes a contiguous float32 CPU qkv [B, T, (H + 2 H_kv) D] with D a "
            f"multiple of 16; got {qkv.dtype} {tuple(qkv.shape)} for H={heads}, H_kv={kv_heads}, "
            f"D={head_dim}"
        )
    y = qkv.new_empty(b, t, heads * head_dim)
    lse = qkv.new_empty(b, heads, t)
    status = native_library().lmarch_causal_attention_forward(
        qkv.data_ptr(), b, t, heads, kv_heads, head_dim, y.data_ptr(), lse.data_ptr(),
        torch.get_num_threads(), dropout, seed, 0,
    )  # fmt: skip
    if status:
        raise MemoryError("lmarch_causal_attention_forward: out of memory")
    return y, lse


def attention_backward(
    qkv: Tensor,
    y: Tensor,
    lse: Tensor,
    grad: Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """d loss / d qkv from d loss / d y (see ``attention.c``)."""
    b, t, _ = qkv.shape
    grad = grad.contiguous()
    dqkv = torch.empty_like(qkv)
    status = native_library().lmarch_causal_attention_backward(
        qkv.data_ptr(), y.data_ptr(), grad.data_ptr(), lse.data_ptr(), b, t, heads, kv_heads,
        head_dim, dqkv.data_ptr(), torch.get_num_threads(), dropout, seed, 0,
    )  # fmt: skip
    if status:
        raise MemoryError("lmarch_causal_attention_backward: out of memory")
    return dqkv


# As PyTorch operators for torch.compile (one opaque call each way) ...
@torch.library.custom_op("lmarch::causal_attention", mutates_args=())
def causal_attention(
    qkv: Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor]:
    """:func:`attention_forward` as an operator."""
    return attention_forward(qkv, heads, kv_heads, head_dim)


@causal_attention.register_fake
def _(qkv: Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    b, t, _ = qkv.shape
    return qkv.new_empty(b, t, heads * head_dim), qkv.new_empty(b, heads, t)


@torch.library.custom_op("lmarch::causal_attention_backward", mutates_args=())
def causal_attention_backward(
    qkv: Tensor, y: Tensor, lse: Tensor, grad: Tensor, heads: int, kv_heads: int, head_dim: int
) -> Tensor:
    """:func:`attention_backward` as an operator."""
    return attention_backward(qkv, y, lse, grad, heads, kv_heads, head_dim)


@causal_attention_backward.register_fake
def _(qkv, y, lse, grad, heads, kv_heads, head_dim):  # type: ignore[no-untyped-def]
    return torch.empty_like(qkv)


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    qkv, heads, kv_heads, head_dim = inputs
    y, lse = output
    ctx.save_for_backward(qkv, y, lse)
    ctx.shape = (heads, kv_heads, head_dim)


def _backward(ctx, grad_y, _grad_lse):  # type: ignore[no-untyped-def]
    qkv, y, lse = ctx.saved_tensors
    return causal_attention_backward(qkv, y, lse, grad_y, *ctx.shape), None, None, None


causal_attention.register_autograd(_backward, setup_context=_setup)


# ... and, outside compiled graphs, as an autograd Function (an operator call costs ~0.1 ms more)
class _PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:  # type: ignore[override]
        y, lse = attention_forward(qkv, heads, kv_heads, head_dim)
        ctx.save_for_backward(qkv, y, lse)
        ctx.shape = (heads, kv_heads, head_dim)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        qkv, y, lse = ctx.saved_tensors
        return attention_backward(qkv, y, lse, grad, *ctx.shape), None, None, None


def packed_causal_attention(qkv: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for every head of a packed projection
    qkv [B, T, (H + 2 H_kv) D] (float32, CPU; D a multiple of 16) -> [B, T, H D]."""
    qkv = qkv.contiguous()
    if torch.compiler.is_compiling():
        return causal_attention(qkv, heads, kv_heads, head_dim)[0]
    return _PackedCausalAttention.apply(qkv, heads, kv_heads, head_dim)


__all__ = [
    "attention_backward",
    "attention_forward",
    "causal_attention",
    "causal_attention_backward",
    "packed_causal_attention",
]
