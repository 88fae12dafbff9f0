"""Raw-text generation with a loaded model, with the figures a benchmark or a script wants."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lmarch.generation import GenerationStats, SamplingConfig, stream_text
from lmarch.loading import LoadedModel


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
        compile=loaded.compile_decode,
    )


def prepare_for_decoding(loaded: LoadedModel, compile: bool = False) -> None:
    """Remember ``compile`` for the decode steps (see
    :func:`lmarch.generation.generate.compiled_step`). Quantisation is chosen when loading:
    ``lmarch.load(spec, quant=...)``."""
    if compile and loaded.quant in ("int8", "int4"):
        # Eager decoding is fastest with bf16 activations (fewer bytes through the many small
        # ops); a compiled step fuses those ops, and Inductor's CPU code is much faster in
        # float32 on CPUs without bf16 arithmetic (26 against 41+ ms per SmolLM2 token here).
        # The quantised layers keep their bf16 operands and convert their inputs themselves.
        loaded.model.float()
    loaded.compile_decode = compile
