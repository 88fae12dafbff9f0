"""Cross-attention, the encoder-decoder cache and the decoder block (Vaswani et al. 2017, sec. 3.2.3).

In an encoder-decoder Transformer each decoder layer attends twice: to its own past (masked
self-attention, :class:`~lmarch.nn.attention.MultiHeadAttention`) and to the encoder's output
``memory`` (cross-attention). Cross-attention is the same equation with queries from the decoder
and keys/values from the encoder:

    CrossAttn(X, M) = Concat(head_1, ..., head_h) W_O,
    head_i = softmax((X W_Q^i)(M W_K^i)^T * scale + B + P) (M W_V^i)

where P is -inf at the encoder's padding positions (0 elsewhere) and B an optional additive
position bias (none in the paper, BART or T5; kept for symmetry with self-attention).

The keys and values depend on the encoder output only, so while decoding they are computed once
per sequence and reused at every step: :class:`EncoderDecoderCache` holds them next to the
decoder's self-attention :class:`~lmarch.nn.cache.KVCache`, and reorders both by batch index for
beam search (``reorder(indices)``).

:class:`CrossAttentionBlock` is the decoder layer: self-attention, cross-attention and a
feed-forward network, each a residual branch, pre- or post-normalised like
:class:`~lmarch.nn.block.TransformerBlock` (which is the encoder's, and a decoder-only model's,
layer).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lmarch.nn.attention import (
    MultiHeadAttention,
    QKTransform,
    head_geometry,
    padding_mask,
    scaled_dot_product_attention,
)
from lmarch.nn.cache import KVCache


def memory_padding_mask(memory_mask: Tensor | None) -> Tensor | None:
    """The encoder's mask in the form attention takes: a [B, S] 0/1 (or boolean) mask of real
    tokens becomes a boolean [B, 1, 1, S]; a mask with 4 dims (already broadcastable to
    [B, H, T, S], True = may attend) or None is returned as it is."""
    if memory_mask is None or memory_mask.dim() == 4:
        return memory_mask
    if memory_mask.dim() != 2:
        raise ValueError(
            f"memory_mask must be [B, S] or [B, H, T, S], got {tuple(memory_mask.shape)}"
        )
    return padding_mask(memory_mask)


class EncoderDecoderCache:
    """What a decoder keeps between steps: its self-attention :class:`KVCache` plus, per layer,
    the cross-attention keys/values [B, H_kv, S, D] of the encoder output (computed on the first
    call of each layer, reused afterwards) and the encoder's padding mask.

    ``self_attention`` is written at ``start`` each step as in a decoder-only model; ``cross[i]``
    is None until layer i's :class:`CrossAttention` fills it. ``memory_mask`` (a [B, S] 0/1 mask
    of the encoder's real tokens, or None) is kept here so a one-token step needs only the new
    token, the cache and its position. :meth:`reorder` selects batch rows (beam search).
    """

    def __init__(
        self, self_attention: KVCache, n_layers: int, memory_mask: Tensor | None = None
    ) -> None:
        self.self_attention = self_attention
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.memory_mask = memory_mask

    @classmethod
    def for_memory(
        cls,
        self_attention: KVCache,
        layers: Sequence[CrossAttention],
        memory: Tensor,
        memory_mask: Tensor | None = None,
    ) -> EncoderDecoderCache:
        """A cache whose cross keys/values are every layer's (``layers``: the decoder's
        cross-attentions, in order) of the encoder output ``memory`` [B, S, d], computed now,
        once per source, in the self-attention cache's dtype."""
        cache = cls(self_attention, len(layers), memory_mask)
        dtype = self_attention.keys.dtype
        for i, layer in enumerate(layers):
            k, v = layer.memory_kv(memory)
            cache.cross[i] = (k.to(dtype), v.to(dtype))
        return cache

    @property
    def max_len(self) -> int:
        """Positions the self-attention cache holds."""
        return self.self_attention.max_len

    def reorder(self, indices: Tensor, length: int | None = None) -> None:
        """Keep batch rows ``indices`` (a 1-d long tensor) in every tensor: row j becomes old row
        ``indices[j]``. The self-attention cache is reordered in place (:meth:`KVCache.reorder`,
        its first ``length`` positions; the number of rows must stay the batch size); the cross
        keys/values and mask may change their number of rows (a batch expanded to
        ``batch * beams``). Beam search over one prompt's beams needs only
        ``self_attention.reorder``: the cross keys/values are the same for all of them."""
        self.self_attention.reorder(indices, length)
        self.cross = [
            None if kv is None else (kv[0].index_select(0, indices), kv[1].index_select(0, indices))
            for kv in self.cross
        ]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, indices)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder states ``x`` [B, T, dim] to encoder output ``memory``
    [B, S, memory_dim] (Vaswani et al. 2017, sec. 3.2.3).

    Parameters: ``q`` (dim -> n_heads * head_dim), ``kv`` (memory_dim -> 2 * n_kv_heads *
    head_dim, the key rows then the value rows: one matmul for both) and ``out`` (W_O, back to
    dim). ``bias`` switches the biases of all three (BART and Marian have them, T5 does not);
    ``softmax_scale`` multiplies the scores (None: 1 / sqrt(head_dim); T5 uses 1.0, its
    initialisation folds the scale into W_Q). ``dropout`` drops attention weights and the output,
    as :class:`MultiHeadAttention` does. No causal mask: every query may see every real
    encoder token.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        memory_dim: int | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        implementation: str = "sdpa",
        softmax_scale: float | None = None,
    ) -> None:
        super().__init__()
        n_heads, n_kv_heads, head_dim = head_geometry(dim, n_heads, n_kv_heads, head_dim)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout = dropout
        self.implementation = implementation
        self.softmax_scale = softmax_scale
        self.q = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.kv = nn.Linear(memory_dim or dim, 2 * n_kv_heads * head_dim, bias=bias)
        self.out = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the encoder output: [B, S, memory_dim] -> two [B, H_kv, S, D]."""
        b, s, _ = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.n_kv_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        memory_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        layer_index: int = 0,
    ) -> Tensor:
        """x [B, T, dim] attending to ``memory`` [B, S, memory_dim] -> [B, T, dim].

        ``memory_mask``: the encoder's [B, S] 0/1 mask of real tokens (or a boolean mask
        broadcastable to [B, H, T, S], True = may attend); None: every position is real.
        ``position_bias``: an additive float bias broadcastable to [B, H, T, S].
        With ``cache``, layer ``layer_index``'s keys/values are taken from it when present, and
        computed from ``memory`` and stored there otherwise (``memory`` may then be None); its
        ``memory_mask`` is used when none is passed.
        """
        kv = cache.cross[layer_index] if cache is not None else None
        if kv is None:
            if memory is None:
                raise ValueError("cross-attention needs the encoder output (no cached keys/values)")
            kv = self.memory_kv(memory)
            if cache is not None:
                cache.cross[layer_index] = kv
        k, v = kv
        if memory_mask is None and cache is not None:
            memory_mask = cache.memory_mask
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if k.dtype != q.dtype:  # keys kept in float32 under half-precision weights (CPU)
            q = q.to(k.dtype)
        y = scaled_dot_product_attention(
            q,
            k,
            v,
            mask=memory_padding_mask(memory_mask),
            dropout_p=self.dropout if self.training else 0.0,
            implementation=self.implementation,
            scale=self.softmax_scale,
            bias=position_bias,
        )
        y = y.to(x.dtype).transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(self.out(y))


class CrossAttentionBlock(nn.Module):
    """A decoder layer of an encoder-decoder Transformer: masked self-attention over the target,
    cross-attention to the encoder output, feed-forward; three residual branches.

    Pre-LN (T5, Xiong et al. 2020):
        x = x + SelfAttn(N1(x));  x = x + CrossAttn(N2(x), M);  x = x + FFN(N3(x))
    Post-LN (Vaswani et al. 2017, BART, Marian):
        x = N1(x + SelfAttn(x));  x = N2(x + CrossAttn(x, M));  x = N3(x + FFN(x))

    ``self_attn`` should be a causal :class:`MultiHeadAttention`; the norms and feed-forward are
    any modules (the family chooses). Submodule names: ``norm_self``, ``self_attn``,
    ``norm_cross``, ``cross_attn``, ``norm_ffn``, ``ffn``.
    """

    def __init__(
        self,
        self_attn: MultiHeadAttention,
        cross_attn: CrossAttention,
        ffn: nn.Module,
        norm_self: nn.Module,
        norm_cross: nn.Module,
        norm_ffn: nn.Module,
        pre_norm: bool = True,
    ) -> None:
        super().__init__()
        self.norm_self = norm_self
        self.self_attn = self_attn
        self.norm_cross = norm_cross
        self.cross_attn = cross_attn
        self.norm_ffn = norm_ffn
        self.ffn = ffn
        self.pre_norm = pre_norm

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        position_bias: Tensor | None = None,
        cross_position_bias: Tensor | None = None,
        qk_transform: QKTransform | None = None,
    ) -> Tensor:
        """x [B, T, dim] (decoder states at positions ``start .. start+T-1``) -> [B, T, dim].

        ``attention_mask`` / ``position_bias`` / ``qk_transform`` go to the self-attention
        (boolean mask over the target keys, combined with its causal mask; additive bias;
        RoPE hook); ``memory``, ``memory_mask`` and ``cross_position_bias`` to the
        cross-attention. With ``cache``, the self-attention writes its keys/values into
        ``cache.self_attention`` at ``start`` and the cross-attention reuses ``cache.cross``.
        """
        self_kw: dict = dict(
            attention_mask=attention_mask,
            cache=cache.self_attention if cache is not None else None,
            layer_index=layer_index,
            start=start,
            qk_transform=qk_transform,
        )
        if position_bias is not None:
            self_kw["position_bias"] = position_bias
        cross_kw = dict(
            memory_mask=memory_mask,
            position_bias=cross_position_bias,
            cache=cache,
            layer_index=layer_index,
        )
        if self.pre_norm:
            x = x + self.self_attn(self.norm_self(x), **self_kw)
            x = x + self.cross_attn(self.norm_cross(x), memory, **cross_kw)
            return x + self.ffn(self.norm_ffn(x))
        x = self.norm_self(x + self.self_attn(x, **self_kw))
        x = self.norm_cross(x + self.cross_attn(x, memory, **cross_kw))
        return self.norm_ffn(x + self.ffn(x))


__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "EncoderDecoderCache",
    "memory_padding_mask",
]
