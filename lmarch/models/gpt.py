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

from lmarch.nn import (
    MLP,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    TransformerBlock,
)
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
                    c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout, implementation=c.attention
                ),
                ffn=MLP(c.n_embd, c.n_inner or 4 * c.n_embd, c.activation, c.bias, c.dropout),
                norm_attn=LayerNorm(c.n_embd, c.layer_norm_eps, c.bias),
                norm_ffn=LayerNorm(c.n_embd, c.layer_norm_eps, c.bias),
                pre_norm=True,
            )
            for _ in range(c.n_layer)
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
