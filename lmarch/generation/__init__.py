"""Decoding: next-token selection (greedy, temperature, top-k/p, min-p, repetition penalty),
the generation loop with KV cache, stop strings and streaming."""

from lmarch.generation.generate import (
    GenerationConfig,
    GenerationStats,
    generate,
    iter_tokens,
    stream_text,
)
from lmarch.generation.sampling import SamplingConfig, StopStringMatcher, select_next_token

__all__ = [
    "GenerationConfig",
    "GenerationStats",
    "SamplingConfig",
    "StopStringMatcher",
    "generate",
    "iter_tokens",
    "select_next_token",
    "stream_text",
]
