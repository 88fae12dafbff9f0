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
        compile=loaded.extra.get("compile", False),
    )


QUANT_SCHEMES = ("none", "int8", "int4")


def prepare_for_decoding(loaded: LoadedModel, quant: str = "none", compile: bool = False) -> float:
    """Make ``loaded`` fast to decode on a CPU and return the seconds it took.

    ``quant="int8"`` / ``"int4"`` replace every Linear (output head included) by a weight-only
    quantised layer and switch activations to bfloat16, the only input type the CPU kernels
    are fast with; ``"none"`` keeps exact float32. ``compile`` is remembered on the loaded
    model for the decode steps (see :func:`lmarch.generation.generate.compiled_step`).
    """
    import time

    import torch

    from lmarch.errors import LmarchError
    from lmarch.quant.apply import quantize_

    if quant not in QUANT_SCHEMES:
        raise LmarchError(
            f"unknown quantisation {quant!r}", hint=f"one of {', '.join(QUANT_SCHEMES)}"
        )
    start = time.perf_counter()
    if quant != "none":
        loaded.model.to(torch.bfloat16)
        quantize_(loaded.model, quant)
    loaded.extra["compile"] = compile
    return time.perf_counter() - start
