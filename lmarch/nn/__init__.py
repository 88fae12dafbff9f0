"""Building blocks shared by every model family."""

from lmarch.nn.attention import (
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    reference_attention,
    repeat_kv,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cache import KVCache
from lmarch.nn.cross_attention import (
    CrossAttention,
    CrossAttentionBlock,
    EncoderDecoderCache,
    memory_padding_mask,
)
from lmarch.nn.ffn import MLP, GatedMLP, get_activation, swiglu_hidden_dim
from lmarch.nn.flash import flash_attention
from lmarch.nn.norm import LayerNorm, OffsetRMSNorm, RMSNorm, build_norm
from lmarch.nn.pooling import l2_normalize, pool
from lmarch.nn.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    apply_rotary,
    rope_inverse_frequencies,
    rotate_half,
    sinusoidal_table,
)
from lmarch.nn.relative_bias import RelativePositionBias, relative_position_bucket

__all__ = [
    "MLP",
    "CrossAttention",
    "CrossAttentionBlock",
    "EncoderDecoderCache",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "OffsetRMSNorm",
    "RMSNorm",
    "RelativePositionBias",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "TransformerBlock",
    "apply_rotary",
    "build_norm",
    "causal_mask",
    "flash_attention",
    "get_activation",
    "l2_normalize",
    "memory_padding_mask",
    "padding_mask",
    "pool",
    "reference_attention",
    "relative_position_bucket",
    "repeat_kv",
    "rope_inverse_frequencies",
    "rotate_half",
    "scaled_dot_product_attention",
    "sliding_window_mask",
    "sinusoidal_table",
    "swiglu_hidden_dim",
]
