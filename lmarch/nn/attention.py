"""Scaled dot-product attention and multi-head attention (Vaswani et al. 2017, sec. 3.2).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

where M is 0 where a query may look and -inf where it may not (the causal mask hides the future,
the padding mask hides pad tokens). An optional additive ``bias`` B joins M inside the softmax,
softmax(Q K^T * scale + B + M) V: T5's relative position bias (Raffel et al. 2020) is one. Multi-head attention runs h such attentions on learned
projections of width d_k = d / h and concatenates them:

    MultiHead(X) = Concat(head_1, ..., head_h) W_O,   head_i = Attention(X W_Q^i, X W_K^i, X W_V^i)

Grouped-query attention (Ainslie et al. 2023) lets ``n_kv_heads`` < ``n_heads``: each group of
n_heads / n_kv_heads query heads shares one key/value head (multi-query when n_kv_heads == 1).

Three variants of later decoders are options of the same module: sliding-window attention
(Beltagy et al. 2020; Mistral, Gemma), where query i sees only keys i - W < j <= i; logit
soft-capping (Gemma 2), scores -> c tanh(scores / c) before the mask; and QK-norm (Dehghani et
al. 2023; Qwen3, Gemma 3), a norm over each query and key head before the position hook.

This file is the reference: the equation written out (:func:`reference_attention`) and PyTorch's
fused SDPA; one-token decoding steps compute the same equation as two batched products
(:func:`grouped_query_decode_attention`). lmarch's native kernel for causal self-attention is a
subclass swapped in from outside (:func:`lmarch.native.accelerate`). Where PyTorch would run its
CPU flash kernel under autograd, the call goes through :class:`lmarch.nn.sdpa_grad.CpuFlashAttention`
(the same kernels), because that kernel's backward cannot be differentiated a second time.
``implementation="flash"`` runs the tiled algorithm written out in :mod:`lmarch.nn.flash`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.nn.cache import KVCache
from lmarch.nn.sdpa_grad import CpuFlashAttention, picks_cpu_flash

# A hook applied to queries and keys after projection, before attention: rotary embeddings
# (RoPE) plug in here. Arguments: q [B,H,T,D], k [B,H_kv,T,D], start position of this chunk.
QKTransform = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]

# "sdpa": PyTorch's fused kernels; "reference": the equation written out; "flash": the tiled
# online-softmax algorithm written out (lmarch.nn.flash; no attention dropout)
ATTENTION_IMPLEMENTATIONS = ("sdpa", "reference", "flash")


def causal_mask(n_queries: int, n_keys: int, device: torch.device | None = None) -> Tensor:
    """Boolean [n_queries, n_keys] mask, True where allowed.

    Queries are the last ``n_queries`` positions of a sequence of ``n_keys`` (bottom-right
    aligned), so query i may see keys 0 .. n_keys - n_queries + i. This is what decoding with a
    cache needs; for n_queries == n_keys it is the usual lower triangle.
    """
    offset = n_keys - n_queries
    q_pos = torch.arange(n_queries, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(n_keys, device=device).unsqueeze(0)
    return k_pos <= q_pos


def sliding_window_mask(query_positions: Tensor, n_keys: int, window: int) -> Tensor:
    """Boolean [T, n_keys] mask, True where allowed: query at position p (``query_positions``,
    [T]) sees keys p - window < j <= p, the last ``window`` positions, itself included (Beltagy
    et al. 2020; Mistral's and Gemma's local layers). Key j is the j-th slot of the sequence."""
    k_pos = torch.arange(n_keys, device=query_positions.device)[None, :]
    q_pos = query_positions[:, None]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def soft_cap(scores: Tensor, cap: float) -> Tensor:
    """Logit soft-capping (Gemma 2, Gemma Team 2024): c tanh(s / c), which keeps |s| < c."""
    return torch.tanh(scores / cap) * cap


def padding_mask(attention_mask: Tensor) -> Tensor:
    """From a [B, T_k] 0/1 mask of real tokens to a boolean [B, 1, 1, T_k] mask, True where allowed."""
    return attention_mask.bool()[:, None, None, :]


def attention_scale(head_dim: int, scale: float | None = None) -> float:
    """The factor on q k^T before the softmax: ``scale``, or the paper's 1 / sqrt(d_k) when None
    (Vaswani et al. 2017, eq. 1)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """The equation written out: softmax(q k^T * scale + bias, masked) v. Slow, for teaching
    and tests. With ``softcap`` c, the scaled scores are soft-capped first: c tanh(s / c).

    ``mask`` is boolean (True = may attend) and broadcasts against [B, H, T_q, T_k]; ``scale``
    defaults to 1 / sqrt(d) (GPT-2 checkpoints may ask for 1, or 1 / (sqrt(d) * layer), T5 for 1);
    ``bias`` is a float tensor added to the scaled scores (same broadcasting as ``mask``).
    """
    scale = attention_scale(q.shape[-1], scale)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1)
    if mask is not None:
        # a query that may see no key (left padding) gets zeros, as the fused kernels give
        weights = weights.masked_fill(~mask, 0.0)
    weights = weights.to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


# PyTorch >= 2.5 lets SDPA share key/value heads itself (no copies for grouped-query attention).
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    implementation: str = "sdpa",
    scale: float | None = None,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Attention over [B, H, T, D] tensors, dispatched to PyTorch's fused kernel or the reference.

    ``is_causal`` applies the causal mask (queries and keys of equal length); ``mask`` is an
    explicit boolean mask. ``implementation`` is ``"sdpa"`` (fused: flash / memory-efficient /
    math kernels chosen by PyTorch), ``"reference"`` (:func:`reference_attention`) or
    ``"flash"`` (:func:`lmarch.nn.flash.flash_attention`: causal and key-padding masks, no
    dropout; a mask of another shape goes to the reference).
    ``scale`` multiplies the scores (default 1 / sqrt(D)). ``bias`` is an additive float bias
    broadcastable to [B, H, T_q, T_k] (T5's relative positions), differentiable; with a bias the
    boolean mask is folded into it as -inf (SDPA takes one float mask) and "flash" runs the
    reference. Second derivatives work on both: when PyTorch picks its CPU flash kernel, its
    once-differentiable backward is wrapped (``sdpa_grad``). ``softcap`` soft-caps the scaled
    scores (:func:`soft_cap`); no fused kernel does, so such calls run the reference.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}")
    n_q, n_k = q.shape[-2], k.shape[-2]
    if softcap is not None:
        implementation = "reference"  # neither SDPA nor the tiled kernel caps the scores
    if implementation == "flash" and bias is not None:
        implementation = "reference"  # the tiled kernel takes no additive bias
    if implementation == "flash":
        if dropout_p > 0:
            raise ValueError("the written-out flash attention has no attention dropout")
        from lmarch.nn.flash import flash_attention  # it builds on this file

        keys = _key_padding(mask, q.shape[0], n_k)
        if mask is None or keys is not None:
            return flash_attention(q, k, v, causal=is_causal, key_padding_mask=keys, scale=scale)
        implementation = "reference"  # a mask per query (static-shape decoding)
    explicit = implementation == "reference" or mask is not None or bias is not None
    if is_causal and (explicit or n_q != n_k):
        # one bottom-right aligned triangle for both paths (SDPA's own is top-left aligned)
        causal = causal_mask(n_q, n_k, q.device)
        mask = causal if mask is None else mask & causal
        is_causal = False
    if implementation == "reference":
        n_rep = q.shape[1] // k.shape[1]
        return reference_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout_p, scale, bias, softcap
        )
    gqa = k.shape[1] != q.shape[1]
    if bias is not None:
        # one float mask: the bias where allowed, -inf where not (SDPA gives an all -inf row zeros)
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    if _SDPA_HAS_GQA and picks_cpu_flash(q, k, v, mask, dropout_p, is_causal, scale, gqa):
        # the same kernels, with a backward that a second derivative can go through
        return CpuFlashAttention.apply(q, k, v, mask, is_causal, scale)
    kwargs = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
    )


def _key_padding(mask: Tensor | None, batch: int, n_keys: int) -> Tensor | None:
    """``mask`` as a [B, S] key-padding mask when it is one ([B, 1, 1, S] or [B, S]), else None."""
    if mask is None or mask.dtype != torch.bool:
        return None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0, :]
    if mask.dim() == 2 and mask.shape[1] == n_keys and mask.shape[0] in (1, batch):
        return mask.expand(batch, n_keys)
    return None


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Expand [B, H_kv, T, D] to [B, H_kv * n_rep, T, D] so each query head has its key/value head."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def grouped_query_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Attention for a few new queries over a key/value cache, as plain matrix products.

    q [B, H, T, D] (T small: one token while decoding), k/v [B, H_kv, S, D], ``allowed`` a
    boolean [T, S] mask or None. The n_rep = H / H_kv query heads that share a key/value head
    are stacked as extra query rows, so one batched product per step serves every group
    without copying keys (Ainslie et al. 2023):

        scores[b, g, (r, t), s] = q[b, g * n_rep + r, t] . k[b, g, s] * scale

    (``scale`` defaults to 1 / sqrt(D); ``softcap`` soft-caps the scores, :func:`soft_cap`).

    For one query PyTorch's fused kernels spend more time setting up than computing; this
    is the same equation in five operations, which ``torch.compile`` also fuses well.
    """
    b, h, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    n_rep = h // h_kv
    rows = q.reshape(b * h_kv, n_rep * t, d)
    keys, values = k.reshape(b * h_kv, s, d), v.reshape(b * h_kv, s, d)
    alpha = attention_scale(d, scale)
    scores = torch.baddbmm(rows.new_empty(()), rows, keys.transpose(1, 2), beta=0.0, alpha=alpha)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.repeat(n_rep, 1), float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(weights, values).reshape(b, h, t, d)


def head_geometry(
    dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None
) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of an attention layer: ``n_kv_heads``
    defaults to ``n_heads`` (and must divide it), ``head_dim`` to ``dim / n_heads``."""
    n_kv_heads = n_kv_heads or n_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if head_dim is None:
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        head_dim = dim // n_heads
    return n_heads, n_kv_heads, head_dim


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with grouped-query support and an optional KV cache.

    The query, key and value projections are one fused matrix ``qkv`` (rows: the n_heads query
    heads, then the n_kv_heads key heads, then the n_kv_heads value heads), so a single matmul
    produces all three; ``out`` is W_O. ``softmax_scale`` multiplies the scores before the
    softmax; None means the paper's 1 / sqrt(head_dim).

    Options of later decoders, all off by default: ``q_norm`` / ``k_norm`` (QK-norm: modules
    applied to each query / key head, [..., head_dim], before ``qk_transform``),
    ``sliding_window`` W (query i sees keys i - W < j <= i: :func:`sliding_window_mask`) and
    ``logit_softcap`` c (scores -> c tanh(scores / c) before the mask: :func:`soft_cap`).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        causal: bool = True,
        implementation: str = "sdpa",
        softmax_scale: float | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        n_heads, n_kv_heads, head_dim = head_geometry(dim, n_heads, n_kv_heads, head_dim)
        if (q_norm is None) != (k_norm is None):
            raise ValueError("QK-norm needs both q_norm and k_norm")
        if sliding_window is not None and (sliding_window < 1 or not causal):
            raise ValueError(
                f"sliding_window must be >= 1 on causal attention, got {sliding_window}"
            )
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal = causal
        self.dropout = dropout
        self.implementation = implementation
        self.softmax_scale = softmax_scale
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(n_heads * head_dim, dim, bias=bias if out_bias is None else out_bias)
        self.resid_dropout = nn.Dropout(dropout)
        # registered only when given, so the state dict of plain attention is unchanged
        self.q_norm, self.k_norm = q_norm, k_norm
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        qk_transform: QKTransform | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        """x: [B, T, dim] -> [B, T, dim].

        ``attention_mask`` is a boolean mask broadcastable to [B, H, T, T_k] (True = may attend),
        combined with the causal mask when the module is causal. With ``cache``, this call's
        keys/values are written at position ``start`` of layer ``layer_index``.
        ``position_bias`` is an additive float bias broadcastable to [B, H, T, T_k] (T_k counts
        the cached keys too), added to the scaled scores: T5's relative position bias.
        """
        kw = dict(attention_mask=attention_mask, cache=cache, layer_index=layer_index, start=start)
        if position_bias is not None:  # only when given: subclasses' attend may not take it
            kw["position_bias"] = position_bias
        return self.attend(self.qkv(x), x.dtype, qk_transform=qk_transform, **kw)

    def attend(
        self,
        qkv: Tensor,
        dtype: torch.dtype,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        qk_transform: QKTransform | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        """The rest of :meth:`forward` after the fused projection: qkv [B, T, (H + 2 H_kv) D]
        -> [B, T, dim]; the heads' output is cast to ``dtype`` (the input's) before W_O."""
        b, t, _ = qkv.shape
        hd = self.head_dim
        device = qkv.device
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        if self.q_norm is not None:  # QK-norm: each head normalised before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if qk_transform is not None:
            q, k = qk_transform(q, k, start)
        if cache is not None:
            k, v = cache.update(layer_index, k, v, start)
            if k.dtype != q.dtype:  # a float32 cache under half-precision weights (CPU)
                q = q.to(k.dtype)
        n_rep = self.n_heads // self.n_kv_heads
        shares_kv = self.implementation == "flash" or (
            self.implementation == "sdpa" and _SDPA_HAS_GQA
        )
        if n_rep > 1 and not shares_kv:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)

        mask, is_causal = attention_mask, False
        one_step = cache is not None and t == 1 and attention_mask is None and not self.training
        window = self._window_mask(start, t, k.shape[2], device)
        if one_step and position_bias is None:
            # one new token over the cache (the common decoding step)
            allowed = window
            if isinstance(start, Tensor) and window is None:  # static shapes: hide unwritten slots
                allowed = torch.arange(k.shape[2], device=device)[None, :] <= start
            y = grouped_query_decode_attention(
                q, k, v, allowed, self.softmax_scale, self.logit_softcap
            )
            if y.dtype != dtype:
                y = y.to(dtype)
            return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * hd))
        if window is not None:  # the window holds the causal limit (and hides unwritten slots)
            mask = window if mask is None else mask & window
        elif isinstance(start, Tensor):
            # static-shape step over the whole cache buffer: hide the positions not written yet
            q_pos = start + torch.arange(t, device=device)
            allowed = torch.arange(k.shape[2], device=device)[None, :] <= q_pos[:, None]
            mask = allowed if mask is None else mask & allowed
        elif self.causal and t > 1:
            if mask is None and k.shape[2] == t:
                is_causal = True  # plain lower triangle: let the fused kernel build it
            else:
                # Cached keys precede the queries, so the triangle must be bottom-right aligned
                # (SDPA's is_causal aligns it top-left); build it explicitly.
                causal = causal_mask(t, k.shape[2], device)
                mask = causal if mask is None else mask & causal
        y = scaled_dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            implementation=self.implementation,
            scale=self.softmax_scale,
            bias=position_bias,
            softcap=self.logit_softcap,
        )
        if y.dtype != dtype:
            y = y.to(dtype)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * hd)
        return self.resid_dropout(self.out(y))

    def _window_mask(
        self, start: int | Tensor, t: int, n_keys: int, device: torch.device
    ) -> Tensor | None:
        """The [t, n_keys] sliding-window mask of this call's queries, None without a window.
        The keys are cache slots 0 .. n_keys - 1 when ``start`` is a tensor (the static buffer),
        else the last n_keys positions, of which the queries are the last t."""
        if self.sliding_window is None:
            return None
        first = start if isinstance(start, Tensor) else n_keys - t
        positions = first + torch.arange(t, device=device)
        return sliding_window_mask(positions, n_keys, self.sliding_window)
