"""FLOPs of a forward pass, counted from a model's config, and measured by PyTorch to check.

A matrix product of an [M, K] by a [K, N] matrix costs 2 M K N floating-point operations (a
multiply and an add per term). A transformer spends almost all its FLOPs in such products, so
per token of a forward pass (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
table 1; Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", appendix F):

    C_forward ~= 2 N  +  4 L T d_attn

2 N for the N weights each token is multiplied by (every projection, feed-forward and the output
head), and 4 L T d_attn for attention itself: in each of the L layers, the scores Q K^T and the
weighted sum of the values, each 2 T d_attn per query over T keys (d_attn = heads x head width).
Chinchilla's appendix counts both products over all T keys, as the dense kernels compute them;
Kaplan's table counts 2 L T d_attn, as a causal mask halves the useful work. Backward costs twice
the forward (a gradient for the inputs and one for the weights), so a training step costs

    C_train ~= 3 C_forward = 6 N + 12 L T d_attn      per token (the "6N rule" + attention).

:func:`count_forward_flops` writes these sums out per family, exactly as lmarch's models run
them (grouped-query widths, gated feed-forwards, cross-attention, ALBERT's shared layers, the
recurrent cells); :func:`measure_flops` runs the model on the ``meta`` device under
``torch.utils.flop_counter.FlopCounterMode``, which counts the same matrix products from the
operations PyTorch actually dispatches — the oracle the tests compare against. Element-wise work
(norms, softmax, activations, the embedding lookup) is left out of both, as in both papers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class FlopCount:
    """Forward FLOPs of one pass over ``batch`` sequences of ``seq_len`` tokens, by component
    (``parts``: name -> FLOPs of the whole pass). For an encoder-decoder, source and target are
    both ``seq_len`` long and a "token" is a target token."""

    seq_len: int
    batch: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def forward(self) -> int:
        """FLOPs of the forward pass."""
        return sum(self.parts.values())

    @property
    def training(self) -> int:
        """FLOPs of a training step: forward + backward (twice the forward)."""
        return 3 * self.forward

    @property
    def tokens(self) -> int:
        """Tokens the pass predicts: batch x seq_len."""
        return self.batch * self.seq_len

    @property
    def forward_per_token(self) -> float:
        """Forward FLOPs per token."""
        return self.forward / self.tokens

    @property
    def training_per_token(self) -> float:
        """Training FLOPs per token (3 x forward)."""
        return self.training / self.tokens

    def add(self, part: str, flops: int) -> None:
        """Add ``flops`` to component ``part``."""
        self.parts[part] = self.parts.get(part, 0) + int(flops)


def _attention_layer(
    f: FlopCount, d: int, heads: int, kv_heads: int, hd: int, tq: int, tk: int, tag: str
) -> None:
    """Self-attention of one layer over ``tq`` queries and ``tk`` keys per sequence."""
    n = f.batch
    f.add(f"{tag} attention projections", 2 * n * tq * d * (heads + 2 * kv_heads) * hd)
    f.add(f"{tag} attention projections", 2 * n * tq * heads * hd * d)
    f.add(f"{tag} attention scores", 4 * n * heads * hd * tq * tk)


def _cross_attention_layer(
    f: FlopCount, d: int, heads: int, hd: int, tq: int, tk: int, tag: str
) -> None:
    """Cross-attention: queries from the ``tq`` target tokens, keys and values from the ``tk``
    encoder outputs (each projected once per layer)."""
    n = f.batch
    f.add(f"{tag} cross-attention projections", 2 * n * (tq * d * heads * hd * 2))
    f.add(f"{tag} cross-attention projections", 2 * n * tk * d * 2 * heads * hd)
    f.add(f"{tag} cross-attention scores", 4 * n * heads * hd * tq * tk)


def _ffn_layer(f: FlopCount, d: int, hidden: int, gated: bool, tokens: int, tag: str) -> None:
    """A feed-forward block: two matrices, or three for a gated unit (SwiGLU, GeGLU)."""
    f.add(f"{tag} feed-forward", 2 * f.batch * tokens * d * hidden * (3 if gated else 2))


def _head(f: FlopCount, d: int, vocab: int) -> None:
    f.add("output head", 2 * f.tokens * d * vocab)


def count_forward_flops(config: Any, seq_len: int, batch: int = 1) -> FlopCount:
    """Matrix-product FLOPs of the family model ``config`` describes (as
    :func:`lmarch.models.registry.build_model` builds it) on ``batch`` x ``seq_len`` tokens.

    Decoders (GPT, LLaMA) and recurrent LMs include their output head; BERT-family encoders are
    the bare encoder (its pooler is not part of the forward pass); encoder-decoders read
    ``seq_len`` source and ``seq_len`` target tokens."""
    from lmarch.models.registry import family_of_config

    family = family_of_config(config).name
    f = FlopCount(seq_len, batch)
    t, c = seq_len, config
    if family == "bigram":
        return f  # a table lookup: no products
    if family == "rnn":
        inputs = [c.n_embd] + [c.hidden_size] * (c.n_layer - 1)
        for width in inputs:  # W_ih x_t and W_hh h_{t-1} for each gate block
            f.add(
                "recurrent cells", 2 * f.tokens * c.gates * c.hidden_size * (width + c.hidden_size)
            )
        _head(f, c.hidden_size, c.vocab_size)
        return f
    if family == "gpt":
        d = c.n_embd
        for _ in range(c.n_layer):
            _attention_layer(f, d, c.n_head, c.n_head, d // c.n_head, t, t, "decoder")
            _ffn_layer(f, d, c.n_inner or 4 * d, False, t, "decoder")
        _head(f, d, c.vocab_size)
        return f
    if family == "llama":
        d = c.n_embd
        for _ in range(c.n_layer):
            _attention_layer(f, d, c.n_head, c.kv_heads, c.dim_per_head, t, t, "decoder")
            _ffn_layer(f, d, c.intermediate_size, True, t, "decoder")
        _head(f, d, c.vocab_size)
        return f
    if family == "bert":
        d = c.n_embd
        if c.embedding_size is not None:  # ALBERT / ELECTRA's factorised embedding
            f.add("embedding projection", 2 * f.tokens * c.embedding_size * d)
        for _ in range(c.n_layer):  # ALBERT runs its shared block n_layer times
            _attention_layer(f, d, c.n_head, c.n_head, d // c.n_head, t, t, "encoder")
            _ffn_layer(f, d, c.intermediate_size, False, t, "encoder")
        return f
    if family == "t5":
        d, hd = c.n_embd, c.head_dim
        for _ in range(c.n_layer):
            _attention_layer(f, d, c.n_head, c.n_head, hd, t, t, "encoder")
            _ffn_layer(f, d, c.intermediate_size, c.gated_ffn, t, "encoder")
        for _ in range(c.decoder_layers):
            _attention_layer(f, d, c.n_head, c.n_head, hd, t, t, "decoder")
            _cross_attention_layer(f, d, c.n_head, hd, t, t, "decoder")
            _ffn_layer(f, d, c.intermediate_size, c.gated_ffn, t, "decoder")
        _head(f, d, c.vocab_size)
        return f
    if family in ("transformer", "bart"):
        d = c.n_embd
        he, hdec = c.encoder_heads, c.decoder_heads
        for _ in range(c.n_encoder_layer):
            _attention_layer(f, d, he, he, d // he, t, t, "encoder")
            _ffn_layer(f, d, c.encoder_ffn, False, t, "encoder")
        for _ in range(c.n_decoder_layer):
            _attention_layer(f, d, hdec, hdec, d // hdec, t, t, "decoder")
            _cross_attention_layer(f, d, hdec, d // hdec, t, t, "decoder")
            _ffn_layer(f, d, c.decoder_ffn, False, t, "decoder")
        _head(f, d, c.decoder_vocab_size)
        return f
    raise ValueError(f"no FLOP count for family {family!r}")


def attention_width(config: Any) -> tuple[int, int]:
    """(attention layers a token passes through, d_attn = heads x head width) — the L and
    d_attn of the attention term; (0, 0) for models without attention."""
    from lmarch.models.registry import family_of_config

    family, c = family_of_config(config).name, config
    if family == "gpt":
        return c.n_layer, c.n_embd
    if family == "llama":
        return c.n_layer, c.n_head * c.dim_per_head
    if family == "bert":
        return c.n_layer, c.n_embd
    if family == "t5":  # encoder self, decoder self and cross
        return c.n_layer + 2 * c.decoder_layers, c.n_head * c.head_dim
    if family in ("transformer", "bart"):
        return c.n_encoder_layer + 2 * c.n_decoder_layer, c.n_embd
    return 0, 0


def dummy_inputs(config: Any, seq_len: int, batch: int, device: str = "meta") -> dict[str, Any]:
    """Keyword arguments for a forward pass of ``config``'s family model on ``device``."""
    from lmarch.models.registry import family_of_config

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    if family_of_config(config).name in ("t5", "transformer", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def measure_flops(
    model: nn.Module, config: Any, seq_len: int, batch: int = 1, backward: bool = False
) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts for one forward pass
    (and, with ``backward``, the backward of its summed output) of ``model`` on dummy tokens
    on the model's device — ``meta`` works, so no memory is allocated for the weights."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(**dummy_inputs(config, seq_len, batch, str(device)))
        if backward:
            out.float().sum().backward()
    return int(counter.get_total_flops())


__all__ = [
    "FlopCount",
    "attention_width",
    "count_forward_flops",
    "dummy_inputs",
    "measure_flops",
]
