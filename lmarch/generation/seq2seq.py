"""Decoding with encoder-decoder models (the Transformer, T5, BART, Marian): one greedy loop
and the beam-search entry point, over one step interface every such family provides.

An encoder-decoder computes p(y_t | y_<t, x) = Decoder(y_<t, Encoder(x)). The encoder runs
once per source; each decoder layer's cross-attention keys and values of the encoder output are
computed once too, and only the decoder's own self-attention cache grows by one position per
step. A model plugs in with four members:

    encode(input_ids, attention_mask) -> memory [B, S, d]
    make_cache(memory, attention_mask, max_len) -> EncoderDecoderCache
        (every layer's cross keys/values computed now; an empty self-attention cache)
    decode_step(ids [B, T], cache, start) -> logits [B, T, V]
    decoder_start_token_id (on the model or on model.config)

:class:`EncoderDecoderStepper` turns these into the :class:`lmarch.generation.beam.BeamDecoder`
interface that both :func:`greedy_decode` and :func:`seq2seq_beam_search` step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.generation.beam import (
    BeamSearchConfig,
    BeamSearchOutput,
    beam_search,
    constrain_log_probs,
)
from lmarch.nn.cross_attention import EncoderDecoderCache

__all__ = [
    "EncoderDecoderStepper",
    "encoder_decoder_stepper",
    "greedy_decode",
    "seq2seq_beam_search",
    "seq2seq_search_config",
]

_INTERFACE = ("encode", "make_cache", "decode_step")


def decoder_start_token(model: nn.Module) -> int:
    """The token every target starts with: ``model.decoder_start_token_id`` (or its config's);
    a model without it, or without the step interface (module docstring), is refused."""
    start = getattr(model, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    if start is None or not all(hasattr(model, name) for name in _INTERFACE):
        raise LmarchError(
            f"{type(model).__name__} is not an encoder-decoder model lmarch can decode",
            hint="it needs encode, make_cache, decode_step and a decoder_start_token_id",
        )
    return int(start)


class EncoderDecoderStepper:
    """A :class:`lmarch.generation.beam.BeamDecoder` over an encoder-decoder's cache: each step
    feeds new target ids and returns the logits of the last one."""

    def __init__(self, model: nn.Module, cache: EncoderDecoderCache) -> None:
        self.model, self.cache = model, cache
        self.length = 0  # target positions written so far

    def step(self, input_ids: Tensor, start: int) -> Tensor:
        """Logits [rows, V] of the last of ``input_ids`` [rows, T] at positions ``start ..``."""
        self.length = start + input_ids.shape[1]
        return self.model.decode_step(input_ids, self.cache, start)[:, -1]

    def reorder_cache(self, indices: Tensor) -> None:
        """Row i continues old row ``indices[i]``. Only the self-attention cache moves: a beam's
        parent is a beam of the same source, so the cross keys/values stay where they are."""
        self.cache.self_attention.reorder(indices, self.length)


def encoder_decoder_stepper(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    rows_per_source: int = 1,
    max_len: int | None = None,
) -> EncoderDecoderStepper:
    """Encode the sources [B, S] once, repeat each ``rows_per_source`` times (row b * K + k is
    beam k of source b) and allocate a decoder cache of ``max_len`` target positions."""
    memory = model.encode(input_ids, attention_mask)
    if rows_per_source > 1:
        memory = memory.repeat_interleave(rows_per_source, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(rows_per_source, dim=0)
    return EncoderDecoderStepper(model, model.make_cache(memory, attention_mask, max_len))


def seq2seq_search_config(model: nn.Module, **settings: Any) -> BeamSearchConfig:
    """A :class:`BeamSearchConfig` for ``model``: its config's end, padding and forced first /
    last tokens, then ``settings`` (any BeamSearchConfig field) on top."""
    c = model.config
    defaults = {
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "forced_bos_token_id": getattr(c, "forced_bos_token_id", None),
        "forced_eos_token_id": getattr(c, "forced_eos_token_id", None),
    }
    return BeamSearchConfig(**{**defaults, **settings})


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
    **constraints: Any,
) -> Tensor:
    """Greedy decoding, y_t = argmax_y p(y | y_<t, x), as Hugging Face ``generate`` does it for
    encoder-decoders: every row starts with the decoder start token; the step constraints of
    :func:`lmarch.generation.beam.constrain_log_probs` apply (no end before
    ``min_new_tokens``, the config's forced first / last tokens, and ``constraints``:
    ``no_repeat_ngram_size``, ``bad_words_ids``); a finished row continues with padding;
    decoding stops when every row has produced the end token (default: the config's) or after
    ``max_new_tokens``. Returns [B, 1 + n] ids, the start token first."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    config = seq2seq_search_config(
        model,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos,
        **constraints,
    )
    start = decoder_start_token(model)
    was_training = model.training
    model.eval()
    try:
        stepper = encoder_decoder_stepper(model, input_ids, attention_mask, 1, max_new_tokens)
        b, device = input_ids.shape[0], input_ids.device
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for n in range(max_new_tokens):
            logits = stepper.step(ids[:, -1:], n).float()
            logits = constrain_log_probs(logits, ids, n, 1 + max_new_tokens, config)
            token = logits.argmax(dim=-1).masked_fill(done, model.config.pad_token_id)
            ids = torch.cat((ids, token[:, None]), dim=1)
            done |= token == eos
            if bool(done.all()):
                break
        return ids
    finally:
        model.train(was_training)


def seq2seq_beam_search(
    model: nn.Module,
    input_ids: Tensor,
    config: BeamSearchConfig,
    attention_mask: Tensor | None = None,
) -> BeamSearchOutput:
    """Beam search (:func:`lmarch.generation.beam.beam_search`) with an encoder-decoder for the
    sources ``input_ids`` [B, S] (padded rows marked 0 in ``attention_mask``): sources encoded
    once, every decoder started from the model's decoder start token."""
    start = decoder_start_token(model)
    was_training = model.training
    model.eval()
    try:
        stepper = encoder_decoder_stepper(
            model, input_ids, attention_mask, config.num_beams, config.max_new_tokens
        )
        prompt = torch.full(
            (input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device
        )
        return beam_search(stepper, prompt, config)
    finally:
        model.train(was_training)
