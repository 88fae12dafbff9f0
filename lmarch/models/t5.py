"""T5: the text-to-text encoder-decoder Transformer of Raffel et al. 2020 (and T5 v1.1, mT5).

The encoder-decoder of Vaswani et al. 2017 with these changes, each a building block of
``lmarch.nn`` chosen by the config:

    pre-norm residual blocks            x = x + F(N(x)), N = RMS norm without bias or mean
                                        (y = x / sqrt(mean(x^2) + eps) * g)
    no position embeddings              a learned bias per head and relative-position bucket is
                                        added to the attention scores: bidirectional buckets in
                                        the encoder, causal in the decoder; each stack's table
                                        sits in its first layer and serves all its layers
    unscaled scores                     softmax(q k^T + b) v: no 1 / sqrt(d_k) (the
                                        initialisation of W_Q folds it in)
    no biases                           in any projection or norm
    shared input embedding              one table for the encoder and decoder inputs

Versions (Raffel et al. 2020; the T5 v1.1 notes; Xue et al. 2021, "mT5"):

    v1      FFN(x) = ReLU(x W_i) W_o; output head tied to the embedding, the decoder's output
            rescaled by d_model^-0.5 before it (the embedding's scale suits the inputs)
    v1.1    gated-GELU FFN(x) = (GELU(x W_i0) * (x W_i1)) W_o (Shazeer 2020), untied head,
            no rescaling; mT5 is v1.1 with a 250k multilingual vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmarch.models.validate import (
    ConfigError,
    check_bool,
    check_choice,
    check_flash_dropout,
    check_fraction,
    check_int,
    check_optional_int,
    check_positive,
)
from lmarch.nn import (
    MLP,
    CrossAttention,
    CrossAttentionBlock,
    EncoderDecoderCache,
    GatedMLP,
    KVCache,
    MultiHeadAttention,
    RelativePositionBias,
    RMSNorm,
    TransformerBlock,
    padding_mask,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS

T5_VARIANTS = ("t5", "mt5")


@dataclass
class T5Config:
    """T5 hyper-parameters; defaults are T5 v1 small (Raffel et al. 2020, table 14: 60M).

    ``head_dim`` is T5's d_kv (n_head * head_dim need not equal n_embd). ``block_size`` is the
    length sequences are cut to for training; relative positions set no hard limit.
    ``gated_ffn`` with ``activation`` gives the feed-forward (v1: relu, not gated; v1.1 and
    mT5: gated gelu_tanh). ``tie_embeddings`` makes the output head the input embedding;
    ``scale_output`` multiplies the decoder output by n_embd^-0.5 before the head (v1).
    ``variant`` names the Hugging Face layout it comes from or is written to (t5 or mt5).
    The token ids are T5's: padding 0 (also the decoder's start), end of sequence 1.
    ``dropout`` acts where T5's does (embeddings, attention weights, each sub-layer's output,
    the final states) except inside the feed-forward, after its activation, where T5 drops once
    more; it changes training only.
    """

    vocab_size: int = 32128
    block_size: int = 512
    n_layer: int = 6  # encoder layers
    n_decoder_layer: int | None = None  # None: as many as the encoder
    n_head: int = 8
    n_embd: int = 512
    head_dim: int = 64
    intermediate_size: int = 2048
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    activation: str = "relu"
    gated_ffn: bool = False
    tie_embeddings: bool = True
    scale_output: bool = True
    dropout: float = 0.1
    attention: str = "sdpa"
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    variant: str = "t5"

    def __post_init__(self) -> None:
        name = "T5Config"
        for field_name in (
            "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "head_dim",
            "intermediate_size", "relative_attention_num_buckets",
        ):  # fmt: skip
            check_int(name, field_name, getattr(self, field_name))
        check_optional_int(name, "n_decoder_layer", self.n_decoder_layer)
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(
                f"{name}.relative_attention_num_buckets must be at least 4 (two directions of "
                f"exact and log-spaced buckets), got {self.relative_attention_num_buckets}",
                "relative_attention_num_buckets",
            )
        exact = self.relative_attention_num_buckets // 4  # the encoder's exact buckets
        check_int(name, "relative_attention_max_distance", self.relative_attention_max_distance)
        if self.relative_attention_max_distance <= exact:
            raise ConfigError(
                f"{name}.relative_attention_max_distance must exceed the {exact} exactly "
                f"bucketed offsets (num_buckets / 4), got {self.relative_attention_max_distance}",
                "relative_attention_max_distance",
            )
        for field_name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            check_int(name, field_name, getattr(self, field_name), low=0)
            if getattr(self, field_name) >= self.vocab_size:
                raise ConfigError(
                    f"{name}.{field_name} must be below vocab_size ({self.vocab_size}), got "
                    f"{getattr(self, field_name)}",
                    field_name,
                )
        check_positive(name, "layer_norm_eps", self.layer_norm_eps)
        check_fraction(name, "dropout", self.dropout)
        check_choice(name, "activation", self.activation, sorted(ACTIVATIONS))
        check_choice(name, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_choice(name, "variant", self.variant, T5_VARIANTS)
        check_flash_dropout(name, self.attention, self.dropout)
        for field_name in ("gated_ffn", "tie_embeddings", "scale_output"):
            check_bool(name, field_name, getattr(self, field_name))

    @property
    def decoder_layers(self) -> int:
        """Number of decoder layers."""
        return self.n_decoder_layer or self.n_layer

    @property
    def max_positions(self) -> int:
        """The nominal context length (``block_size``)."""
        return self.block_size


def _attention(c: T5Config, causal: bool) -> MultiHeadAttention:
    return MultiHeadAttention(
        c.n_embd,
        c.n_head,
        head_dim=c.head_dim,
        bias=False,
        dropout=c.dropout,
        causal=causal,
        implementation=c.attention,
        softmax_scale=1.0,
    )


def _ffn(c: T5Config) -> nn.Module:
    if c.gated_ffn:
        return GatedMLP(c.n_embd, c.intermediate_size, c.activation, bias=False, dropout=c.dropout)
    return MLP(c.n_embd, c.intermediate_size, c.activation, bias=False, dropout=c.dropout)


class T5Encoder(nn.Module):
    """The encoder stack: pre-norm self-attention blocks with a shared bidirectional relative
    position bias, then a final RMS norm."""

    def __init__(self, c: T5Config) -> None:
        super().__init__()
        self.relative_bias = RelativePositionBias(
            c.n_head, c.relative_attention_num_buckets, c.relative_attention_max_distance, True
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                attn=_attention(c, causal=False),
                ffn=_ffn(c),
                norm_attn=RMSNorm(c.n_embd, c.layer_norm_eps),
                norm_ffn=RMSNorm(c.n_embd, c.layer_norm_eps),
                pre_norm=True,
            )
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.n_embd, c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Embedded tokens [B, S, d] (``attention_mask`` [B, S]: 1 = real) -> states [B, S, d]."""
        s = x.shape[1]
        bias = self.relative_bias(s, s)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, attention_mask=mask, position_bias=bias)
        return self.dropout(self.norm(x))


class T5Decoder(nn.Module):
    """The decoder stack: pre-norm blocks of causal self-attention (shared causal relative
    position bias), cross-attention to the encoder output, and feed-forward."""

    def __init__(self, c: T5Config) -> None:
        super().__init__()
        self.relative_bias = RelativePositionBias(
            c.n_head, c.relative_attention_num_buckets, c.relative_attention_max_distance, False
        )
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(
                self_attn=_attention(c, causal=True),
                cross_attn=CrossAttention(
                    c.n_embd,
                    c.n_head,
                    head_dim=c.head_dim,
                    bias=False,
                    dropout=c.dropout,
                    implementation=c.attention,
                    softmax_scale=1.0,
                ),
                ffn=_ffn(c),
                norm_self=RMSNorm(c.n_embd, c.layer_norm_eps),
                norm_cross=RMSNorm(c.n_embd, c.layer_norm_eps),
                norm_ffn=RMSNorm(c.n_embd, c.layer_norm_eps),
                pre_norm=True,
            )
            for _ in range(c.decoder_layers)
        )
        self.norm = RMSNorm(c.n_embd, c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        memory_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """Embedded target tokens [B, T, d] at positions ``start ..`` -> states [B, T, d].

        ``memory`` [B, S, d] is the encoder output (None when ``cache`` holds its keys and
        values), ``memory_mask`` its [B, S] real-token mask, ``attention_mask`` the target's
        [B, T_total] real-token mask (optional; the causal mask always applies)."""
        t = x.shape[1]
        bias = self.relative_bias(t, start + t, offset=start)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                memory,
                attention_mask=mask,
                memory_mask=memory_mask,
                cache=cache,
                layer_index=i,
                start=start,
                position_bias=bias,
            )
        return self.dropout(self.norm(x))


class T5(nn.Module):
    """T5 for conditional generation: ``forward(input_ids, attention_mask, decoder_input_ids)``
    gives the decoder's next-token logits [B, T, vocab].

    For generation: :meth:`encode` the source once, :meth:`make_cache` (cross-attention keys
    and values computed there, once), then :meth:`decode_step` per token: the interface that
    :mod:`lmarch.generation.seq2seq` (greedy decoding and beam search) steps.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.n_embd)
        self.encoder = T5Encoder(c)
        self.decoder = T5Decoder(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        if self.shared.weight.device.type != "meta":  # on meta, weights are loaded later
            self.reset_parameters()

    @property
    def max_positions(self) -> int:
        """The nominal context length (relative positions put no hard limit)."""
        return self.config.block_size

    @property
    def decoder_start_token_id(self) -> int:
        """The token every decoder sequence starts with (T5: the padding id)."""
        return self.config.decoder_start_token_id

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mesh TensorFlow's initialisation, as T5 was trained: unit-variance embeddings, each
        projection N(0, 1 / fan_in), W_Q with a further 1 / d_kv (the score scale it replaces),
        norms at 1."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
            elif isinstance(module, RelativePositionBias):
                module.embedding.weight.normal_(0.0, c.n_embd**-0.5)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.qkv.weight[: c.n_head * c.head_dim] /= c.head_dim**0.5
            elif isinstance(module, CrossAttention):
                module.q.weight /= c.head_dim**0.5
        self.shared.weight.normal_(0.0, 1.0)
        if not c.tie_embeddings:
            self.lm_head.weight.normal_(0.0, 1.0)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder's output [B, S, d] for source ids [B, S] (``attention_mask``: 1 = real)."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def _logits(self, h: Tensor) -> Tensor:
        if self.config.scale_output:
            h = h * self.config.n_embd**-0.5
        return self.lm_head(h)

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_output: Tensor | None,
        attention_mask: Tensor | None = None,
        *,
        decoder_attention_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """Logits [B, T, vocab] for target ids [B, T] at positions ``start ..``, attending to
        ``encoder_output`` (``attention_mask``: the source's [B, S] real-token mask)."""
        h = self.decoder(
            self.shared(decoder_input_ids),
            encoder_output,
            memory_mask=attention_mask,
            attention_mask=decoder_attention_mask,
            cache=cache,
            start=start,
        )
        return self._logits(h)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        *,
        decoder_attention_mask: Tensor | None = None,
        encoder_output: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits [B, T, vocab]: source ids [B, S] (``attention_mask`` [B, S],
        1 = real), target ids [B, T] starting with the decoder start token (see
        :meth:`shift_right`). ``encoder_output`` skips the encoder when given."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (shift_right(labels) makes them)")
        if encoder_output is None:
            encoder_output = self.encode(input_ids, attention_mask)
        return self.decode(
            decoder_input_ids,
            encoder_output,
            attention_mask,
            decoder_attention_mask=decoder_attention_mask,
        )

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for ``labels`` [B, T]: the start token, then the labels but the last
        (ignored positions, -100, become padding)."""
        ids = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        ids[:, 1:] = labels[:, :-1]
        return ids.masked_fill(ids == -100, self.config.pad_token_id)

    def make_cache(
        self,
        encoder_output: Tensor,
        attention_mask: Tensor | None = None,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> EncoderDecoderCache:
        """A decoding cache for ``encoder_output`` [B, S, d]: every layer's cross-attention keys
        and values computed now (once per sequence), the source mask, and an empty
        self-attention cache of ``max_len`` target positions (default ``block_size``)."""
        c = self.config
        kv = KVCache.like(
            self.decoder.norm.weight,
            c.decoder_layers,
            encoder_output.shape[0],
            c.n_head,
            max_len or c.block_size,
            c.head_dim,
            dtype,
        )
        layers = [block.cross_attn for block in self.decoder.blocks]
        return EncoderDecoderCache.for_memory(kv, layers, encoder_output, attention_mask)

    def decode_step(self, input_ids: Tensor, cache: EncoderDecoderCache, start: int) -> Tensor:
        """Logits [B, T, vocab] of target ids [B, T] (one token per step while generating) at
        positions ``start ..``, reading and extending ``cache``."""
        return self.decode(input_ids, None, cache=cache, start=start)


__all__ = ["T5", "T5Config", "T5Decoder", "T5Encoder"]
