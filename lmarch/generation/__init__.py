"""Decoding: next-token selection (greedy, temperature, top-k/p, min-p, repetition penalty),
the generation loop with KV cache, stop strings and streaming, and beam search."""

from lmarch.generation.beam import (
    BeamSearchConfig,
    BeamSearchOutput,
    beam_search,
    beam_search_prompts,
)
from lmarch.generation.generate import (
    GenerationConfig,
    GenerationStats,
    generate,
    iter_tokens,
    stream_text,
)
from lmarch.generation.sampling import SamplingConfig, StopStringMatcher, select_next_token
from lmarch.generation.seq2seq import greedy_decode, seq2seq_beam_search

__all__ = [
    "BeamSearchConfig",
    "BeamSearchOutput",
    "GenerationConfig",
    "GenerationStats",
    "SamplingConfig",
    "StopStringMatcher",
    "beam_search",
    "beam_search_prompts",
    "generate",
    "greedy_decode",
    "iter_tokens",
    "select_next_token",
    "seq2seq_beam_search",
    "stream_text",
]
