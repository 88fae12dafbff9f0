"""A BLIP-style captioner (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training").

    v = ViT(image)                                   image tokens [B, 1 + N, d_v]
    h = Emb(y) + P(0..T-1)                           caption tokens, shifted right
    h = Decoder(h, v)                                L blocks: causal self-attention,
                                                     cross-attention to v, FFN (pre-LN)
    p(y_t | y_<t, image) = softmax(LN(h_t) W_E^T)    language-modelling (LM) head, tied
    p(match | image, y) = softmax(W_itm LN(h_eos))   image-text matching (ITM) head

BLIP trains three objectives together: image-text contrast (ITC), image-text matching (ITM) on
hard negatives, and captioning (LM). Its ITM runs an image-grounded text *encoder* (bidirectional
self-attention, an [ENC] token) that shares the cross-attention and feed-forward layers with the
causal decoder. Here the ITM head reads the decoder's own state at the caption's end token: under
causal attention that token has seen the whole caption and, through cross-attention, the image,
so it plays the [ENC] token's part with every weight shared (the paper shares all but the
self-attention). ITC is left out: the shapes' captions are scored by ITM directly.

The decoder is :class:`~lmarch.nn.cross_attention.CrossAttentionBlock`, the block of every
encoder-decoder in lmarch, and generation is :func:`lmarch.generation.seq2seq.greedy_decode`:
the model exposes ``encode`` (pixels -> image tokens), ``make_cache`` and ``decode_step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmarch.models.validate import (
    ConfigError,
    check_choice,
    check_divides,
    check_fraction,
    check_int,
    check_positive,
)
from lmarch.models.vit import ViT, ViTConfig
from lmarch.nn import (
    MLP,
    CrossAttention,
    CrossAttentionBlock,
    EncoderDecoderCache,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS
from lmarch.nn.init import init_normal


@dataclass
class BlipConfig:
    """Captioner hyper-parameters. Defaults are a small model for the generated shapes (BLIP's
    own decoder is BERT-base, 12 x 768, over a ViT-B/16)."""

    vocab_size: int = 561
    block_size: int = 16  # longest caption, start and end tokens included
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    intermediate_size: int = 128
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    pad_token_id: int = 560
    bos_token_id: int = 559
    eos_token_id: int = 560
    decoder_start_token_id: int = 559
    attention: str = "sdpa"
    vision: ViTConfig = field(
        default_factory=lambda: ViTConfig(
            image_size=32, patch_size=8, n_layer=2, n_head=4, n_embd=64, intermediate_size=128
        )
    )

    def __post_init__(self) -> None:
        owner = "BlipConfig"
        if isinstance(self.vision, dict):  # read back from a saved run
            self.vision = ViTConfig(**self.vision)
        if not isinstance(self.vision, ViTConfig):
            raise ConfigError(f"{owner}: vision must be a ViTConfig", "vision")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "intermediate_size", self.intermediate_size)
        check_divides(owner, "n_embd", self.n_embd, "n_head", self.n_head)
        check_choice(owner, "activation", self.activation, sorted(ACTIVATIONS))
        check_positive(owner, "layer_norm_eps", self.layer_norm_eps)
        check_fraction(owner, "dropout", self.dropout)
        check_choice(owner, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            check_int(owner, name, getattr(self, name), low=0)
            if getattr(self, name) >= self.vocab_size:
                raise ConfigError(
                    f"{owner}.{name} must be below vocab_size ({self.vocab_size}), "
                    f"got {getattr(self, name)}",
                    name,
                )


class Blip(nn.Module):
    """ViT encoder + cross-attending text decoder with an LM head and an ITM head.

    ``forward(pixels, decoder_input_ids)`` gives caption logits [B, T, V];
    :meth:`itm_logits` gives match / no-match logits [B, 2] for image-caption pairs.
    """

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = ViT(c.vision)
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = LearnedPositionalEmbedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(
                self_attn=MultiHeadAttention(
                    c.n_embd, c.n_head, dropout=c.dropout, causal=True, implementation=c.attention
                ),
                cross_attn=CrossAttention(
                    c.n_embd,
                    c.n_head,
                    memory_dim=c.vision.n_embd,
                    dropout=c.dropout,
                    implementation=c.attention,
                ),
                ffn=MLP(c.n_embd, c.intermediate_size, c.activation, dropout=c.dropout),
                norm_self=LayerNorm(c.n_embd, c.layer_norm_eps),
                norm_cross=LayerNorm(c.n_embd, c.layer_norm_eps),
                norm_ffn=LayerNorm(c.n_embd, c.layer_norm_eps),
                pre_norm=True,
            )
            for _ in range(c.n_layer)
        )
        self.norm_f = LayerNorm(c.n_embd, c.layer_norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.itm_head = nn.Linear(c.n_embd, 2)
        for name, module in self.named_modules():
            if not name.startswith("vision"):
                init_normal(module)  # N(0, 0.02) as BERT, BLIP's text side

    @property
    def decoder_start_token_id(self) -> int:
        """The token every caption starts with."""
        return self.config.decoder_start_token_id

    def encode(self, pixels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image tokens ``memory`` [B, 1 + N, d_v] of pixels [B, C, H, W] (every token is real:
        ``attention_mask`` is accepted for the seq2seq interface and must be None)."""
        if attention_mask is not None:
            raise ValueError("an image has no padding: attention_mask must be None")
        return self.vision(pixels).hidden

    def hidden_states(
        self,
        ids: Tensor,
        memory: Tensor | None,
        *,
        cache: EncoderDecoderCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """Final-normalised decoder states [B, T, d] of ids [B, T] at positions ``start ..``."""
        if start + ids.shape[1] > self.config.block_size:
            raise ValueError(
                f"a caption of {start + ids.shape[1]} tokens exceeds block_size "
                f"{self.config.block_size}"
            )
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, memory, cache=cache, layer_index=i, start=start)
        return self.norm_f(x)

    def forward(self, pixels: Tensor, decoder_input_ids: Tensor) -> Tensor:
        """Teacher-forced caption logits [B, T, V] (inputs: the caption shifted right)."""
        return self.lm_head(self.hidden_states(decoder_input_ids, self.encode(pixels)))

    def itm_logits(self, memory: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """Match (column 1) / no-match (column 0) logits [B, 2] of image tokens ``memory``
        and captions ``ids`` [B, T] (start token first), read at each caption's last real
        token, ``lengths - 1`` (right padding is never seen: attention is causal)."""
        h = self.hidden_states(ids, memory)
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
        return self.itm_head(last)

    def make_cache(
        self, memory: Tensor, attention_mask: Tensor | None = None, max_len: int | None = None
    ) -> EncoderDecoderCache:
        """A decoding cache: each layer's cross keys/values of ``memory`` computed once, and an
        empty self-attention cache of ``max_len`` positions (default: ``block_size``)."""
        c = self.config
        self_attention = KVCache.like(
            self.tok_emb.weight,
            c.n_layer,
            memory.shape[0],
            c.n_head,
            min(max_len or c.block_size, c.block_size),
            c.n_embd // c.n_head,
        )
        layers = [block.cross_attn for block in self.blocks]
        return EncoderDecoderCache.for_memory(self_attention, layers, memory, attention_mask)

    def decode_step(self, ids: Tensor, cache: EncoderDecoderCache, start: int) -> Tensor:
        """Logits [B, T, V] of ids [B, T] at positions ``start ..``, extending ``cache``."""
        return self.lm_head(self.hidden_states(ids, None, cache=cache, start=start))


__all__ = ["Blip", "BlipConfig"]
