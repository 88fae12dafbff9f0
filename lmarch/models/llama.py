"""LLaMA: the decoder-only Transformer of Touvron et al. 2023 (LLaMA 1, 2 and 3).

GPT-2's shape with four substitutions, each a building block from ``lmarch.nn``:

    RMSNorm instead of LayerNorm        y = x / sqrt(mean(x^2) + eps) * g
    rotary position embeddings          q_m, k_n rotated by angles m*omega, n*omega (no table)
    SwiGLU feed-forward                 FFN(x) = W_down (SiLU(W_gate x) * (W_up x))
    grouped-query attention             n_kv_heads <= n_heads key/value heads (LLaMA 2 70B, 3)

No biases anywhere; untied output head except in small models (SmolLM2 ties it).

Later decoders are this one with a few options (config fields whose defaults are LLaMA's; see
docs/families.md): biases on q/k/v only (Qwen2), QK-norm (Qwen3, Gemma 3), sliding-window
attention on all or some layers (Mistral, Phi-3, Gemma 2/3) with its own RoPE base there
(Gemma 3), and Gemma's set: embeddings scaled by sqrt(d), RMSNorm gains stored as 1 + w, norms on
the sublayer outputs too ("sandwich"), GeGLU, the score scale 1/sqrt(query_pre_attn_scalar) and
soft-capped attention scores and logits, c tanh(s / c) (Gemma 2).
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
    OffsetRMSNorm,
    RMSNorm,
    TransformerBlock,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS, soft_cap
from lmarch.nn.ffn import ACTIVATIONS
from lmarch.nn.init import init_normal
from lmarch.nn.position import MAX_ROTARY_POSITIONS, check_rope_scaling, rotary_embedding

# the kinds of attention layer: over every earlier key, or over a sliding window of them
LAYER_TYPES = ("full", "sliding")


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
    # the variants of later decoders (docs/families.md); the defaults are LLaMA's
    attention_out_bias: bool | None = None  # output projection bias; None: attention_bias's
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None = None  # keys a sliding layer sees, itself included (Mistral)
    layer_types: tuple[str, ...] | None = None  # "full"/"sliding" per layer; None: all alike
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3)
    norm_unit_offset: bool = False  # RMSNorm y = x / rms(x) * (1 + w) (Gemma)
    embedding_scale: bool = False  # embeddings multiplied by sqrt(n_embd) (Gemma)
    sandwich_norm: bool = False  # RMSNorm on the attention and FFN outputs too (Gemma 2/3)
    query_pre_attn_scalar: float | None = None  # s: scores times 1/sqrt(s) (Gemma)
    attn_logit_softcap: float | None = None  # attention scores s -> c tanh(s / c) (Gemma 2)
    final_logit_softcap: float | None = None  # output logits z -> c tanh(z / c) (Gemma 2)

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
        self._check_variants(name)

    def _check_variants(self, name: str) -> None:
        if self.attention_out_bias is not None:
            check_bool(name, "attention_out_bias", self.attention_out_bias)
        for field_name in ("qk_norm", "norm_unit_offset", "embedding_scale", "sandwich_norm"):
            check_bool(name, field_name, getattr(self, field_name))
        check_optional_int(name, "sliding_window", self.sliding_window)
        for field_name in (
            "rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap",
            "final_logit_softcap",
        ):  # fmt: skip
            if getattr(self, field_name) is not None:
                check_positive(name, field_name, getattr(self, field_name))
        if isinstance(self.layer_types, list):  # read back from JSON
            self.layer_types = tuple(self.layer_types)
        if self.layer_types is not None and not isinstance(self.layer_types, tuple):
            raise ConfigError(
                f"{name}.layer_types must be a list of 'full' / 'sliding', got "
                f"{self.layer_types!r}",
                "layer_types",
            )
        if self.layer_types:
            for kind in self.layer_types:
                check_choice(name, "layer_types", kind, LAYER_TYPES)
            if len(self.layer_types) != self.n_layer:
                raise ConfigError(
                    f"{name}.layer_types names {len(self.layer_types)} layers, n_layer is "
                    f"{self.n_layer}",
                    "layer_types",
                )
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ConfigError(
                    f"{name}.layer_types has sliding layers but sliding_window is not set",
                    "sliding_window",
                )

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

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends through the sliding window."""
        if self.layer_types:
            return tuple(kind == "sliding" for kind in self.layer_types)
        return (self.sliding_window is not None,) * self.n_layer

    @property
    def softmax_scale(self) -> float | None:
        """The factor on q k^T: 1/sqrt(query_pre_attn_scalar), or None for 1/sqrt(head_dim)."""
        q = self.query_pre_attn_scalar
        return None if q is None else q**-0.5


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
        # Gemma 3's sliding layers rotate with their own base (and without the global scaling)
        self.rotary_local = None
        if c.rope_local_theta is not None:
            self.rotary_local = rotary_embedding(
                hd, c.block_size, theta=c.rope_local_theta, rotary_dim=c.rotary_dim
            )
        self.blocks = nn.ModuleList(self._block(sliding) for sliding in c.sliding_layers)
        self.norm_f = self._norm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":  # on meta, weights are loaded later
            self.apply(init_normal)

    def _norm(self, dim: int) -> nn.Module:
        c = self.config
        return (
            OffsetRMSNorm(dim, c.rms_norm_eps)
            if c.norm_unit_offset
            else RMSNorm(dim, c.rms_norm_eps)
        )

    def _block(self, sliding: bool) -> TransformerBlock:
        """One layer: LLaMA's, with the variants the config asks for."""
        c, hd = self.config, self.config.dim_per_head
        return TransformerBlock(
            attn=MultiHeadAttention(
                c.n_embd,
                c.n_head,
                n_kv_heads=c.kv_heads,
                head_dim=hd,
                bias=c.attention_bias,
                out_bias=c.attention_out_bias,
                dropout=c.dropout,
                implementation=c.attention,
                softmax_scale=c.softmax_scale,
                q_norm=self._norm(hd) if c.qk_norm else None,
                k_norm=self._norm(hd) if c.qk_norm else None,
                sliding_window=c.sliding_window if sliding else None,
                logit_softcap=c.attn_logit_softcap,
            ),
            ffn=GatedMLP(c.n_embd, c.intermediate_size, c.activation, c.mlp_bias, c.dropout),
            norm_attn=self._norm(c.n_embd),
            norm_ffn=self._norm(c.n_embd),
            pre_norm=True,
            post_norm_attn=self._norm(c.n_embd) if c.sandwich_norm else None,
            post_norm_ffn=self._norm(c.n_embd) if c.sandwich_norm else None,
        )

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
        if self.config.embedding_scale:  # sqrt(d) rounded to the activations' dtype, as Gemma's
            x = x * x.new_tensor(self.config.n_embd**0.5)
        for i, block in enumerate(self.blocks):
            local = self.rotary_local is not None and block.attn.sliding_window is not None
            x = block(
                x,
                attention_mask=attention_mask,
                cache=cache,
                layer_index=i,
                start=start,
                qk_transform=self.rotary_local if local else self.rotary,
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
        logits = self.lm_head(h[:, -1:] if last_only else h)
        cap = self.config.final_logit_softcap
        return logits if cap is None else soft_cap(logits, cap)
