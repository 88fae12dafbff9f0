"""Causal self-attention over a packed ``qkv`` projection on lmarch's CPU kernel (``attention.c``).

``packed_causal_attention(qkv, H, H_kv, D)`` maps the output of a fused q/k/v projection,
[B, T, (H + 2 H_kv) D], to the attention output [B, T, H D] that the output projection reads:
softmax(q k^T / sqrt(D), causal) v per head, grouped-query when H_kv < H. It is a PyTorch operator
with its own backward (``lmarch::causal_attention``), so it trains, and ``torch.compile`` keeps
it as one opaque call. The forward saves the log-sum-exp of each row and the backward
recomputes the probabilities from it (FlashAttention's trick; memory O(B H T), not O(B H T^2)).
Under ``create_graph=True`` (second derivatives) the eager backward recomputes the attention with
PyTorch's operators from the saved projection, so its gradient is differentiable again.

:class:`NativeCausalAttention` is the :class:`~lmarch.nn.attention.MultiHeadAttention` that
:func:`lmarch.native.accelerate` swaps in: the kernel for the calls
:func:`lmarch.native.policy.causal_attention_call` accepts, the reference forward for the rest.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmarch.native import native_library
from lmarch.native.policy import causal_attention_call
from lmarch.nn.attention import MultiHeadAttention, QKTransform, causal_mask, repeat_kv
from lmarch.nn.cache import KVCache


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
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        qkv, y, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            again = reference_causal_attention(qkv, *ctx.shape)  # the saved qkv keeps its graph
            return torch.autograd.grad(again, qkv, grad, create_graph=True)[0], None, None, None
        return attention_backward(qkv, y, lse, grad, *ctx.shape), None, None, None


def reference_causal_attention(
    qkv: Tensor, heads: int, kv_heads: int, head_dim: int, keep: Tensor | None = None
) -> Tensor:
    """What the kernel computes, in PyTorch's operators (twice differentiable): qkv
    [B, T, (H + 2 H_kv) D] -> [B, T, H D]; ``keep`` [B, H, T, T], when given, multiplies the
    probabilities (a dropout mask already scaled by 1 / (1 - p))."""
    b, t, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(b, t, heads, head_dim).transpose(1, 2)
    k = repeat_kv(k.reshape(b, t, kv_heads, head_dim).transpose(1, 2), heads // kv_heads)
    v = repeat_kv(v.reshape(b, t, kv_heads, head_dim).transpose(1, 2), heads // kv_heads)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    probs = torch.softmax(scores.masked_fill(~causal_mask(t, t, qkv.device), float("-inf")), -1)
    if keep is not None:
        probs = probs * keep
    return (probs @ v).transpose(1, 2).reshape(b, t, heads * head_dim)


def packed_causal_attention(qkv: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for every head of a packed projection
    qkv [B, T, (H + 2 H_kv) D] (float32, CPU; D a multiple of 16) -> [B, T, H D]."""
    qkv = qkv.contiguous()
    if torch.compiler.is_compiling():
        return causal_attention(qkv, heads, kv_heads, head_dim)[0]
    return _PackedCausalAttention.apply(qkv, heads, kv_heads, head_dim)


class NativeCausalAttention(MultiHeadAttention):
    """:class:`~lmarch.nn.attention.MultiHeadAttention` whose plain causal self-attention calls
    run on ``attention.c`` between the same projections (same parameters, same state dict);
    every other call (cache, mask, position hook, autocast, other dtypes or devices, dropout in
    training, T > ``NATIVE_MAX_LEN``) takes the reference :meth:`attend`."""

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        qk_transform: QKTransform | None = None,
    ) -> Tensor:
        """x: [B, T, dim] -> [B, T, dim], as :meth:`MultiHeadAttention.forward`."""
        qkv = self.qkv(x)
        if causal_attention_call(self, qkv, attention_mask, cache, qk_transform):
            y = packed_causal_attention(qkv, self.n_heads, self.n_kv_heads, self.head_dim)
            return self.resid_dropout(self.out(y))
        kw = dict(attention_mask=attention_mask, cache=cache, layer_index=layer_index, start=start)
        return self.attend(qkv, x.dtype, qk_transform=qk_transform, **kw)


__all__ = [
    "NativeCausalAttention",
    "attention_backward",
    "attention_forward",
    "causal_attention",
    "causal_attention_backward",
    "packed_causal_attention",
    "reference_causal_attention",
]
