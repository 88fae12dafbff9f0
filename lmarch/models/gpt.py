"""GPT: a decoder-only Transformer language model (Radford et al. 2018, 2019 — GPT-2).

    h_0 = W_e[x] + W_p[0..T-1]                       token + learned position embeddings
    h_l = Block_l(h_{l-1}),  l = 1..L                pre-LN blocks: masked self-attention, GELU MLP
    p(x_{t+1} | x_<=t) = softmax(LN(h_L) W_e^T)      output head tied to the token embeddings

GPT-2's changes over GPT-1 are all config here: LayerNorm moved to the input of each sub-block
(pre-LN), a final LayerNorm after the last block, and residual projections initialised with std
0.02 / sqrt(2 L) so the residual stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmarch.models.validate import (
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
    MLP,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    TransformerBlock,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS
from lmarch.nn.init import init_normal


@dataclass
class GPTConfig:
    """GPT hyper-parameters; defaults are GPT-2 small (124M). Names follow nanoGPT."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    tie_embeddings: bool = True
    attention: str = "sdpa"
    # GPT-2 checkpoint options (transformers' GPT2Config): scores are multiplied by
    # (1/sqrt(d_head) if scale_attn_weights else 1) / (l + 1 if scale_attn_by_inverse_layer_idx
    # else 1) in layer l (0-based); the second comes from Stanford CRFM's Mistral GPT-2 runs.
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        name = "GPTConfig"
        for field_name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(name, field_name, getattr(self, field_name))
        check_divides(name, "n_embd", self.n_embd, "n_head", self.n_head)
        check_optional_int(name, "n_inner", self.n_inner)
        check_fraction(name, "dropout", self.dropout)
        check_positive(name, "layer_norm_eps", self.layer_norm_eps)
        check_choice(name, "activation", self.activation, sorted(ACTIVATIONS))
        check_choice(name, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_flash_dropout(name, self.attention, self.dropout)
        for field_name in ("bias", "tie_embeddings", "scale_attn_weights"):
            check_bool(name, field_name, getattr(self, field_name))
        check_bool(name, "scale_attn_by_inverse_layer_idx", self.scale_attn_by_inverse_layer_idx)

    def softmax_scale(self, layer: int) -> float | None:
        """The attention-score scale of layer ``layer`` (0-based); None when it is the paper's
        1 / sqrt(d_head), so the attention keeps its default (and fast) path."""
        if self.scale_attn_weights and not self.scale_attn_by_inverse_layer_idx:
            return None
        scale = (self.n_embd // self.n_head) ** -0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        return scale


class GPT(nn.Module):
    """The GPT-2 architecture. ``forward`` maps token ids [B, T] to next-token logits [B, T, V]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = LearnedPositionalEmbedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                attn=MultiHeadAttention(
                    c.n_embd,
                    c.n_head,
                    bias=c.bias,
                    dropout=c.dropout,
                    implementation=c.attention,
                    softmax_scale=c.softmax_scale(i),
                ),
                ffn=MLP(c.n_embd, c.n_inner or 4 * c.n_embd, c.activation, c.bias, c.dropout),
                norm_attn=LayerNorm(c.n_embd, c.layer_norm_eps, c.bias),
                norm_ffn=LayerNorm(c.n_embd, c.layer_norm_eps, c.bias),
                pre_norm=True,
            )
            for i in range(c.n_layer)
        )
        self.norm_f = LayerNorm(c.n_embd, c.layer_norm_eps, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":  # on meta, weights are loaded later
            self.apply(init_normal)
            residual_std = 0.02 / math.sqrt(2 * c.n_layer)
            for block in self.blocks:
                nn.init.normal_(block.attn.out.weight, std=residual_std)
                nn.init.normal_(block.ffn.fc_out.weight, std=residual_std)

    @property
    def max_positions(self) -> int:
        """Longest sequence the learned position table covers."""
        return self.config.block_size

    def make_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A static KV cache sized for this model (``max_len`` defaults to ``block_size``)."""
        c = self.config
        return KVCache.like(
            self.tok_emb.weight,
            c.n_layer,
            batch_size,
            c.n_head,
            max_len or c.block_size,
            c.n_embd // c.n_head,
            dtype,
        )

    def forward(
        self,
        input_ids: Tensor,
        *,
        cache: KVCache | None = None,
        start: int = 0,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, vocab] for ids [B, T] that sit at positions ``start .. start+T-1``
        (with ``last_only``, [B, 1, vocab] for the last position: what a prompt's prefill needs)."""
        t = input_ids.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}"
            )
        positions = torch.arange(start, start + t, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, attention_mask=attention_mask, cache=cache, layer_index=i, start=start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm_f(x))
