"""BART (Lewis et al. 2019) and Marian (Junczys-Dowmunt et al. 2018): the Transformer
encoder-decoder of :mod:`lmarch.models.transformer` with their own details.

BART, a denoising autoencoder ("BART: Denoising Sequence-to-Sequence Pre-training"):

    e = LN_emb(Emb(x) [* sqrt(d) if scale_embedding] + P[2 + (0..S-1)])
    post-LN encoder and decoder blocks with GELU feed-forwards (sec. 2.1)
    logits = h W_E^T + b_final                     head tied to the shared table, a fixed bias

Its learned position tables have two extra rows at the front (fairseq reserved them for
padding-aware positions), so position p reads row p + 2.

Marian (MarianNMT, the OPUS-MT models): the same body with fixed sinusoidal positions laid out
as all sines then all cosines, embeddings scaled by sqrt(d), no LayerNorm on the embeddings,
the activation its config names (swish in OPUS-MT), and a separate target vocabulary when the
config says so. Both are ``BartConfig``s; ``variant`` picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmarch.models.transformer import EncoderDecoderShape, Transformer, check_seq2seq_config
from lmarch.models.validate import check_choice, check_optional_int

VARIANTS = ("bart", "marian")


@dataclass
class BartConfig(EncoderDecoderShape):
    """BART / Marian hyper-parameters; defaults are BART-large (Lewis et al. 2019: 12 + 12
    layers, d = 1024, 16 heads, FFN 4096, vocabulary 50265, 1024 positions) as Hugging Face's
    ``BartConfig`` has them.

    ``n_decoder_head`` / ``decoder_intermediate_size`` (None: the encoder's) let the two
    stacks differ, as the Hugging Face configs allow. ``share_embeddings``: one token table for
    both sides; ``tie_embeddings``: the output head is the decoder's table; ``target_vocab_size``
    (Marian's ``decoder_vocab_size``) gives the decoder its own vocabulary.
    """

    variant: str = "bart"
    vocab_size: int = 50265
    target_vocab_size: int | None = None
    block_size: int = 1024
    n_encoder_layer: int = 12
    n_decoder_layer: int = 12
    n_head: int = 16
    n_decoder_head: int | None = None
    n_embd: int = 1024
    intermediate_size: int = 4096
    decoder_intermediate_size: int | None = None
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    share_embeddings: bool = True
    tie_embeddings: bool = True
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2  # BART starts decoding from </s>, Marian from <pad>
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        name = "BartConfig"
        check_choice(name, "variant", self.variant, VARIANTS)
        check_optional_int(name, "decoder_intermediate_size", self.decoder_intermediate_size)
        check_seq2seq_config(self, name, ("n_head", "n_decoder_head"))

    pre_norm = False  # post-LN in both (mBART's pre-LN is not this family)
    final_logits_bias = True

    @property
    def positions(self) -> str:
        """``learned`` (BART) or ``sinusoidal`` (Marian)."""
        return "learned" if self.variant == "bart" else "sinusoidal"

    @property
    def position_offset(self) -> int:
        """Rows of BART's position tables before position 0 (2); Marian's have none."""
        return 2 if self.variant == "bart" else 0

    sinusoid_layout = "halves"  # Marian's: all sines, then all cosines

    @property
    def embedding_norm(self) -> bool:
        """BART normalises the embedding sum (``layernorm_embedding``); Marian does not."""
        return self.variant == "bart"


class Bart(Transformer):
    """BART or Marian (``config.variant``): :class:`Transformer` built from a
    :class:`BartConfig`, initialised as Hugging Face does (N(0, 0.02^2), zero biases, the
    padding rows zero; the logits bias zero)."""

    config: BartConfig

    def __init__(self, config: BartConfig) -> None:
        super().__init__(config)

    def reset_parameters(self) -> None:
        """N(0, 0.02^2) weights and learned positions, zero biases, zero padding rows."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for emb in (self.tok_emb, self.target_embedding):
                emb.weight[self.config.pad_token_id].zero_()
