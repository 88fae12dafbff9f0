"""Raw-text generation with a loaded model, with the figures a benchmark or a script wants."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lmarch.generation import GenerationStats, SamplingConfig, stream_text
from lmarch.weights.loader import LoadedModel


def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int,
    sampling: SamplingConfig,
    *,
    seed: int | None = None,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Stream the continuation of the raw ``prompt`` (special tokens written in it are parsed
    as such). Stops at the model's end-of-text tokens unless ``ignore_eos``."""
    return stream_text(
        loaded.model,
        loaded.tokenizer,
        loaded.encode_prompt(prompt),
        max_new_tokens,
        sampling,
        seed=seed,
        stop=stop,
        stop_token_ids=() if ignore_eos else loaded.stop_token_ids,
        stats=stats,
    )
