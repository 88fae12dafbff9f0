"""LLaMA: the decoder-only Transformer of Touvron et al. 2023 (LLaMA 1, 2 and 3).

GPT-2's shape with four substitutions, each a building block from ``lmarch.nn``:

    RMSNorm instead of LayerNorm        y = x / sqrt(mean(x^2) + eps) * g
    rotary position embeddings          q_m, k_n rotated by angles m*omega, n*omega (no table)
    SwiGLU feed-forward                 FFN(x) = W_down (SiLU(W_gate x) * (W_up x))
    grouped-query attention             n_kv_heads <= n_heads key/value heads (LLaMA 2 70B, 3)

No biases anywhere; untied output head except in small models (SmolLM2 ties it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmarch.models.validate import (
    ConfigError,
    check_bool,
    check_choice,
    check_divides,
    check_flash_dropout,
    check_fraction,
    check_int,
    check_optional_int,
    check_positive,
)
from lmarch.nn import (
    GatedMLP,
    KVCache,
    MultiHeadAttention,
    RMSNorm,
    TransformerBlock,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS
from lmarch.nn.init import init_normal
from lmarch.nn.position import MAX_ROTARY_POSITIONS, check_rope_scaling, rotary_embedding


@dataclass
class LlamaConfig:
    """LLaMA hyper-parameters; defaults are LLaMA 2 7B. ``block_size`` is the context length."""

    vocab_size: int = 32000
    block_size: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None: n_head (multi-head); 1: multi-query
    n_embd: int = 4096
    intermediate_size: int = 11008
    head_dim: int | None = None  # None: n_embd // n_head
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None)
    partial_rotary_factor: float = 1.0
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on the q/k/v and output projections
    mlp_bias: bool = False  # biases on the gate/up and down projections
    activation: str = "silu"  # of the gated unit: SwiGLU's SiLU; "gelu" makes it GeGLU
    dropout: float = 0.0
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        name = "LlamaConfig"
        for field_name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(name, field_name, getattr(self, field_name))
        if self.block_size > MAX_ROTARY_POSITIONS:
            raise ConfigError(
                f"{name}.block_size must be at most {MAX_ROTARY_POSITIONS} (the rotary tables hold "
                f"every position), got {self.block_size}",
                "block_size",
            )
        check_int(name, "intermediate_size", self.intermediate_size)
        check_optional_int(name, "n_kv_head", self.n_kv_head)
        check_optional_int(name, "head_dim", self.head_dim)
        if self.n_kv_head is not None:
            check_divides(name, "n_head", self.n_head, "n_kv_head", self.n_kv_head)
        if self.head_dim is None:
            check_divides(name, "n_embd", self.n_embd, "n_head", self.n_head)
        check_positive(name, "rms_norm_eps", self.rms_norm_eps)
        check_positive(name, "rope_theta", self.rope_theta)
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(
                f"{name}.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}",
                "partial_rotary_factor",
            )
        rotary = int(self.dim_per_head * self.partial_rotary_factor)
        if rotary < 2 or rotary % 2:
            raise ConfigError(
                f"{name}: the rotary width head_dim * partial_rotary_factor = {rotary} must be an "
                "even number >= 2",
                "head_dim",
            )
        if self.rope_scaling is not None:
            try:
                check_rope_scaling(self.rope_scaling, self.rotary_dim, f"{name}.rope_scaling")
            except ValueError as exc:
                raise ConfigError(str(exc), "rope_scaling") from exc
        check_fraction(name, "dropout", self.dropout)
        check_choice(name, "activation", self.activation, sorted(ACTIVATIONS))
        check_choice(name, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_flash_dropout(name, self.attention, self.dropout)
        for field_name in ("tie_embeddings", "attention_bias", "mlp_bias"):
            check_bool(name, field_name, getattr(self, field_name))

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_head or self.n_head

    @property
    def dim_per_head(self) -> int:
        """Width of each attention head."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def rotary_dim(self) -> int:
        """How many dims of each head RoPE rotates."""
        return int(self.dim_per_head * self.partial_rotary_factor)


class Llama(nn.Module):
    """The LLaMA architecture. ``forward`` maps token ids [B, T] to next-token logits [B, T, V]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = c = config
        hd = c.dim_per_head
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.rotary = rotary_embedding(
            hd, c.block_size, theta=c.rope_theta, rotary_dim=c.rotary_dim, scaling=c.rope_scaling
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                attn=MultiHeadAttention(
                    c.n_embd,
                    c.n_head,
                    n_kv_heads=c.kv_heads,
                    head_dim=hd,
                    bias=c.attention_bias,
                    dropout=c.dropout,
                    implementation=c.attention,
                ),
                ffn=GatedMLP(c.n_embd, c.intermediate_size, c.activation, c.mlp_bias, c.dropout),
                norm_attn=RMSNorm(c.n_embd, c.rms_norm_eps),
                norm_ffn=RMSNorm(c.n_embd, c.rms_norm_eps),
                pre_norm=True,
            )
            for _ in range(c.n_layer)
        )
        self.norm_f = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":  # on meta, weights are loaded later
            self.apply(init_normal)

    @property
    def max_positions(self) -> int:
        """Context length the rotary table was built for."""
        return self.config.block_size

    def make_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A static KV cache with ``n_kv_head`` heads per layer (GQA shrinks it n_head/n_kv_head x)."""
        c = self.config
        return KVCache.like(
            self.norm_f.weight,  # the activations' dtype (the embedding may be quantised)
            c.n_layer,
            batch_size,
            c.kv_heads,
            max_len or c.block_size,
            c.dim_per_head,
            dtype,
        )

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        cache: KVCache | None = None,
        start: int | Tensor = 0,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The final normalised hidden states [B, T, n_embd] (before the output head)."""
        t = input_ids.shape[1]
        if isinstance(start, int) and start + t > self.config.block_size:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}"
            )
        x = self.tok_emb(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                attention_mask=attention_mask,
                cache=cache,
                layer_index=i,
                start=start,
                qk_transform=self.rotary,
            )
        return self.norm_f(x)

    def forward(
        self,
        input_ids: Tensor,
        *,
        cache: KVCache | None = None,
        start: int | Tensor = 0,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, vocab] for ids [B, T] at positions ``start .. start+T-1`` (with
        ``last_only``, [B, 1, vocab] for the last position: a prompt's prefill then applies the
        output head once, not once per prompt token)."""
        h = self.hidden_states(input_ids, cache=cache, start=start, attention_mask=attention_mask)
        return self.lm_head(h[:, -1:] if last_only else h)
