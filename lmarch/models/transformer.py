"""The Transformer of Vaswani et al. 2017, "Attention Is All You Need": an encoder-decoder.

    e = Emb(x) * sqrt(d) + PE(0..S-1)              source embeddings (sec. 3.4, 3.5)
    m = Encoder(e)                                 N blocks: self-attention + FFN
    h = Emb(y) * sqrt(d) + PE(0..T-1)              target embeddings, shifted right
    h = Decoder(h, m)                              N blocks: masked self-attention,
                                                   cross-attention to m, FFN
    p(y_t | y_<t, x) = softmax(h_t W_E^T)          output head tied to the embeddings (sec. 3.4)

with PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), every
sub-layer wrapped as LayerNorm(x + Sublayer(x)) (post-LN; ``pre_norm`` gives
x + Sublayer(LayerNorm(x)) with a final LayerNorm on each stack, Xiong et al. 2020), and the
decoder's self-attention masked so position t sees only positions <= t.

Training uses label smoothing, eps_ls = 0.1 (sec. 5.4; :class:`Seq2SeqLoss`), and the
learning-rate schedule of eq. 3 (:func:`lmarch.train.optim.transformer_lr`).

:class:`Transformer` is also the body of BART and Marian (:mod:`lmarch.models.bart`): the
families differ only in what their configs say about positions (sinusoidal or learned, the
offset), a LayerNorm on the embeddings, the activation and a bias on the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.errors import LmarchError
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
    MLP,
    CrossAttention,
    CrossAttentionBlock,
    EncoderDecoderCache,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    SinusoidalPositionalEmbedding,
    TransformerBlock,
    padding_mask,
)
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS

IGNORE_INDEX = -100  # label positions the loss skips (padding), as lmarch.data.masking


class EncoderDecoderShape:
    """What :class:`Transformer` reads from a config beyond its fields: the architecture
    options where BART and Marian differ from the paper (class attributes here, overridden
    by :class:`lmarch.models.bart.BartConfig`) and each stack's sizes."""

    INT_FIELDS = (
        "vocab_size", "block_size", "n_encoder_layer", "n_decoder_layer", "n_head", "n_embd",
        "intermediate_size",
    )  # fmt: skip
    positions = "sinusoidal"  # or "learned"
    position_offset = 0  # rows of a learned table before position 0
    sinusoid_layout = "interleaved"  # the paper's; "halves": sines, then cosines
    embedding_norm = False  # a LayerNorm on the embedding sum
    final_logits_bias = False  # a fixed bias added to the logits

    @property
    def decoder_vocab_size(self) -> int:
        """Size of the target vocabulary (the output head's rows)."""
        return self.target_vocab_size or self.vocab_size  # type: ignore[attr-defined]

    @property
    def encoder_heads(self) -> int:
        """Attention heads of each encoder layer."""
        return self.n_head  # type: ignore[attr-defined]

    @property
    def decoder_heads(self) -> int:
        """Attention heads of each decoder layer (self- and cross-attention)."""
        return getattr(self, "n_decoder_head", None) or self.n_head  # type: ignore[attr-defined]

    @property
    def encoder_ffn(self) -> int:
        """Hidden width of the encoder's feed-forward blocks."""
        return self.intermediate_size  # type: ignore[attr-defined]

    @property
    def decoder_ffn(self) -> int:
        """Hidden width of the decoder's feed-forward blocks."""
        size = getattr(self, "decoder_intermediate_size", None)
        return size or self.intermediate_size  # type: ignore[attr-defined]


@dataclass
class TransformerConfig(EncoderDecoderShape):
    """Hyper-parameters of the original Transformer; defaults are the paper's base model
    (Vaswani et al. 2017, table 3: N = 6, d_model = 512, d_ff = 2048, h = 8, P_drop = 0.1) with
    its shared source/target vocabulary of ~37000 BPE tokens (sec. 5.1).

    ``share_embeddings``: one table for source and target tokens (needs one vocabulary);
    ``tie_embeddings``: the output head is the target table (sec. 3.4 ties all three).
    ``target_vocab_size`` (None: ``vocab_size``) gives the target side its own vocabulary.
    ``dropout`` is the paper's P_drop on every sub-layer output and on the embedding sums;
    ``attention_dropout`` on the attention weights (not in the paper).
    """

    vocab_size: int = 37000
    target_vocab_size: int | None = None
    block_size: int = 1024  # longest source or target sequence
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    intermediate_size: int = 2048
    activation: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    pre_norm: bool = False
    share_embeddings: bool = True
    tie_embeddings: bool = True
    scale_embedding: bool = True  # token embeddings times sqrt(d_model) (sec. 3.4)
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 1  # the first decoder input: <bos>
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        check_seq2seq_config(self, "TransformerConfig", ("n_head",))


def check_seq2seq_config(c: Any, name: str, head_fields: tuple[str, ...]) -> None:
    """The range checks every encoder-decoder config shares (fields named as in
    :class:`TransformerConfig`), raising :class:`ConfigError` naming the field: the
    ``INT_FIELDS`` must be integers >= 1, and ``n_embd`` a multiple of each of ``head_fields``
    that is set."""
    for key in c.INT_FIELDS:
        check_int(name, key, getattr(c, key))
    check_optional_int(name, "target_vocab_size", getattr(c, "target_vocab_size", None))
    for key in head_fields:
        heads = getattr(c, key)
        if heads is not None:
            check_int(name, key, heads)
            check_divides(name, "n_embd", c.n_embd, key, heads)
    check_choice(name, "activation", c.activation, sorted(ACTIVATIONS))
    check_fraction(name, "dropout", c.dropout)
    check_fraction(name, "attention_dropout", c.attention_dropout)
    check_positive(name, "layer_norm_eps", c.layer_norm_eps)
    for key in ("share_embeddings", "tie_embeddings", "scale_embedding"):
        check_bool(name, key, getattr(c, key))
    if c.share_embeddings and c.decoder_vocab_size != c.vocab_size:
        raise ConfigError(
            f"{name}.share_embeddings needs one vocabulary, but the target has "
            f"{c.decoder_vocab_size} tokens and the source {c.vocab_size}",
            "share_embeddings",
        )
    for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        check_int(name, key, getattr(c, key), low=0)
    for key in ("bos_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        check_optional_int(name, key, getattr(c, key), low=0)
    for key in (
        "pad_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id",
        "forced_eos_token_id",
    ):  # fmt: skip
        value = getattr(c, key)
        if value is not None and value >= c.decoder_vocab_size:
            raise ConfigError(
                f"{name}.{key} must be below the target vocabulary size "
                f"({c.decoder_vocab_size}), got {value}",
                key,
            )
    if c.pad_token_id >= c.vocab_size:  # it is the padding row of the source table too
        raise ConfigError(
            f"{name}.pad_token_id must be below vocab_size ({c.vocab_size}), got {c.pad_token_id}",
            "pad_token_id",
        )
    check_bool(name, "pre_norm", c.pre_norm)
    check_choice(name, "attention", c.attention, ATTENTION_IMPLEMENTATIONS)
    check_flash_dropout(name, c.attention, c.attention_dropout)


# ---- the model ----------------------------------------------------------------------------------


class Stack(nn.Module):
    """One side of the model: positions, an optional LayerNorm on the embeddings, the blocks
    and (pre-LN only) a final LayerNorm. Token tables live on the model, as they may be shared."""

    def __init__(self, c: EncoderDecoderShape, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.offset = c.position_offset
        if c.positions == "learned":
            self.pos_emb: nn.Module = LearnedPositionalEmbedding(
                c.block_size + self.offset, c.n_embd
            )
        else:
            self.pos_emb = SinusoidalPositionalEmbedding(
                c.block_size, c.n_embd, layout=c.sinusoid_layout
            )
        self.emb_norm = LayerNorm(c.n_embd, c.layer_norm_eps) if c.embedding_norm else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = LayerNorm(c.n_embd, c.layer_norm_eps) if c.pre_norm else None

    def embed(self, tokens: Tensor, start: int | Tensor) -> Tensor:
        """Scaled token embeddings [B, T, d] plus the positions start .. start+T-1 (BART's
        learned table is read ``offset`` = 2 rows further on), normalised where asked."""
        positions = start + torch.arange(tokens.shape[1], device=tokens.device) + self.offset
        x = tokens + self.pos_emb(positions)[None].to(tokens.dtype)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return self.drop(x)

    def finish(self, x: Tensor) -> Tensor:
        """The final LayerNorm of a pre-LN stack (identity for post-LN)."""
        return x if self.norm_f is None else self.norm_f(x)


def _self_attention(c: Any, heads: int, causal: bool) -> MultiHeadAttention:
    attn = MultiHeadAttention(c.n_embd, heads, causal=causal, implementation=c.attention)
    attn.dropout = c.attention_dropout  # weights; its resid_dropout is P_drop on the output
    attn.resid_dropout = nn.Dropout(c.dropout)
    return attn


def _norm(c: Any) -> LayerNorm:
    return LayerNorm(c.n_embd, c.layer_norm_eps)


class Transformer(nn.Module):
    """The encoder-decoder. ``forward(input_ids, attention_mask, decoder_input_ids)`` gives
    next-token logits [B, T, V_target]; :meth:`encode` and :meth:`decode_step` with an
    :class:`EncoderDecoderCache` serve generation (the encoder runs once per source, each
    decoder layer's cross-attention keys/values are computed once)."""

    def __init__(self, config: EncoderDecoderShape) -> None:
        super().__init__()
        c: Any = config  # a TransformerConfig or a BartConfig
        self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd, padding_idx=c.pad_token_id)
        self.tgt_emb = None
        if not c.share_embeddings:
            self.tgt_emb = nn.Embedding(c.decoder_vocab_size, c.n_embd, padding_idx=c.pad_token_id)
        self.embed_scale = math.sqrt(c.n_embd) if c.scale_embedding else 1.0
        self.encoder = Stack(
            c,
            [
                TransformerBlock(
                    attn=_self_attention(c, c.encoder_heads, causal=False),
                    ffn=MLP(c.n_embd, c.encoder_ffn, c.activation, dropout=c.dropout),
                    norm_attn=_norm(c),
                    norm_ffn=_norm(c),
                    pre_norm=c.pre_norm,
                )
                for _ in range(c.n_encoder_layer)
            ],
        )
        self.decoder = Stack(
            c,
            [
                CrossAttentionBlock(
                    self_attn=_self_attention(c, c.decoder_heads, causal=True),
                    cross_attn=CrossAttention(
                        c.n_embd,
                        c.decoder_heads,
                        dropout=c.attention_dropout,
                        implementation=c.attention,
                    ),
                    ffn=MLP(c.n_embd, c.decoder_ffn, c.activation, dropout=c.dropout),
                    norm_self=_norm(c),
                    norm_cross=_norm(c),
                    norm_ffn=_norm(c),
                    pre_norm=c.pre_norm,
                )
                for _ in range(c.n_decoder_layer)
            ],
        )
        for block in self.decoder.blocks:  # P_drop on the output, attention_dropout inside
            block.cross_attn.resid_dropout = nn.Dropout(c.dropout)
        self.lm_head = nn.Linear(c.n_embd, c.decoder_vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.target_embedding.weight
        if c.final_logits_bias:  # BART's fixed (not trained) bias on the logits
            self.register_buffer("logits_bias", torch.zeros(1, c.decoder_vocab_size))
        else:
            self.logits_bias = None
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases, N(0, d^-1/2) embeddings (times sqrt(d) they
        have unit variance), the padding row zero: the initialisation of fairseq's and
        tensor2tensor's Transformers (the paper does not state one)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for emb in {id(e): e for e in (self.tok_emb, self.target_embedding)}.values():
            nn.init.normal_(emb.weight, std=self.config.n_embd**-0.5)
            with torch.no_grad():
                emb.weight[self.config.pad_token_id].zero_()

    @property
    def target_embedding(self) -> nn.Embedding:
        """The target (decoder input) token table: the shared one unless the sides differ."""
        return self.tok_emb if self.tgt_emb is None else self.tgt_emb

    @property
    def max_positions(self) -> int:
        """Longest source or target sequence the position tables cover."""
        return self.config.block_size

    @property
    def decoder_start_token_id(self) -> int:
        """The token every decoder input starts with."""
        return self.config.decoder_start_token_id

    def _check_length(self, n: int, what: str) -> None:
        if n > self.config.block_size:
            raise LmarchError(
                f"{what} of {n} tokens exceeds the model's {self.config.block_size} positions",
                hint="shorten it (or ask for fewer new tokens)",
            )

    # ---- encoder ------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output ``memory`` [B, S, d] for source ids [B, S] (``attention_mask``: 0/1,
        0 at padding, which no position attends to)."""
        self._check_length(input_ids.shape[1], "a source")
        x = self.encoder.embed(self.tok_emb(input_ids) * self.embed_scale, 0)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        for block in self.encoder.blocks:
            x = block(x, attention_mask=mask)
        return self.encoder.finish(x)

    # ---- decoder ------------------------------------------------------------------------------

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None = None,
        *,
        decoder_attention_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, V] for target ids [B, T] at positions ``start .. start+T-1`` given the
        encoder output (``memory`` may be None once ``cache`` holds the cross keys/values).
        ``decoder_attention_mask`` (0/1 [B, start+T]) hides target padding from the
        self-attention; ``last_only`` applies the head to the last position only."""
        self._check_length(start + decoder_input_ids.shape[1], "a target")
        tokens = self.target_embedding(decoder_input_ids) * self.embed_scale
        x = self.decoder.embed(tokens, start)
        self_mask = (
            padding_mask(decoder_attention_mask) if decoder_attention_mask is not None else None
        )
        for i, block in enumerate(self.decoder.blocks):
            x = block(
                x,
                memory,
                attention_mask=self_mask,
                memory_mask=memory_mask,
                cache=cache,
                layer_index=i,
                start=start,
            )
        x = self.decoder.finish(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)
        return logits if self.logits_bias is None else logits + self.logits_bias

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits [B, T, V_target]: p(y_t | y_<t, x) for every target position.
        ``decoder_input_ids`` are the targets shifted right (:func:`shift_right`)."""
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder needs decoder_input_ids (see shift_right)")
        memory = self.encode(input_ids, attention_mask)
        return self.decode(
            decoder_input_ids,
            memory,
            attention_mask,
            decoder_attention_mask=decoder_attention_mask,
        )

    def make_cache(
        self,
        memory: Tensor,
        attention_mask: Tensor | None = None,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> EncoderDecoderCache:
        """A decoding cache for the encoder output ``memory`` [B, S, d] (``attention_mask``: its
        [B, S] real-token mask): every layer's cross-attention keys/values computed now, once
        per source, and an empty self-attention cache of ``max_len`` target positions."""
        c = self.config
        self_attention = KVCache.like(
            self.lm_head.weight,
            c.n_decoder_layer,
            memory.shape[0],
            c.decoder_heads,
            max_len or c.block_size,
            c.n_embd // c.decoder_heads,
            dtype,
        )
        layers = [block.cross_attn for block in self.decoder.blocks]
        return EncoderDecoderCache.for_memory(self_attention, layers, memory, attention_mask)

    def decode_step(
        self, decoder_input_ids: Tensor, cache: EncoderDecoderCache, start: int
    ) -> Tensor:
        """Logits [B, T, V] of target ids [B, T] (one token per step while generating) at
        positions ``start ..``, reading and extending ``cache``
        (:mod:`lmarch.generation.seq2seq` steps it)."""
        return self.decode(decoder_input_ids, None, cache=cache, start=start)


# ---- training -----------------------------------------------------------------------------------


def shift_right(labels: Tensor, decoder_start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs from targets: [start, y_1, ..., y_{T-1}] (teacher forcing), with ignored
    label positions (-100) read as padding."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def label_smoothed_cross_entropy(
    logits: Tensor, labels: Tensor, epsilon: float = 0.1, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Cross-entropy against the smoothed target q' = (1 - eps) 1[k = y] + eps / V (Szegedy
    et al. 2016, used by Vaswani et al. 2017 sec. 5.4 with eps = 0.1), averaged over the
    positions whose label is not ``ignore_index``:

        L = (1 - eps) * (-log p_y) + eps * (1/V) sum_k (-log p_k)
    """
    if not 0 <= epsilon < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {epsilon}")
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        labels.flatten(),
        ignore_index=ignore_index,
        label_smoothing=epsilon,
    )


@dataclass(frozen=True)
class Seq2SeqLoss:
    """The Trainer's loss function (``loss_fn(model, batch)``) for an encoder-decoder: batches
    are ``(input_ids, attention_mask, decoder_input_ids, labels)``, labels -100 at padding;
    the loss is :func:`label_smoothed_cross_entropy` with ``epsilon`` (0 is plain NLL)."""

    epsilon: float = 0.1

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        input_ids, attention_mask, decoder_input_ids, labels = batch
        logits = model(input_ids, attention_mask, decoder_input_ids)
        return label_smoothed_cross_entropy(logits, labels, self.epsilon)
