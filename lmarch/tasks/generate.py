"""Raw-text generation with a loaded model, with the figures a benchmark or a script wants."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lmarch.generation import GenerationStats, SamplingConfig, stream_text
from lmarch.weights.loader import LoadedModel, quantize_loaded


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
        compile=loaded.extra.get("compile", False),
    )


def prepare_for_decoding(loaded: LoadedModel, quant: str = "none", compile: bool = False) -> float:
    """Make ``loaded`` fast to decode on a CPU and return the seconds it took: quantise it
    (see :func:`lmarch.weights.loader.quantize_loaded`; prefer ``load_model(spec, quant=...)``,
    which builds a GGUF file's int4 layers without a float copy) and remember ``compile`` for
    the decode steps (see :func:`lmarch.generation.generate.compiled_step`)."""
    import time

    start = time.perf_counter()
    quantize_loaded(loaded, quant)
    if compile and loaded.extra.get("quant", "none") != "none":
        # Eager decoding is fastest with bf16 activations (fewer bytes through the many small
        # ops); a compiled step fuses those ops, and Inductor's CPU code is much faster in
        # float32 on CPUs without bf16 arithmetic (26 against 41+ ms per SmolLM2 token here).
        # The quantised layers keep their bf16 operands and convert their inputs themselves.
        loaded.model.float()
    loaded.extra["compile"] = compile
    return time.perf_counter() - start
