"""Raw-text generation with a loaded model, with the figures a benchmark or a script wants."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmarch.generation import GenerationConfig, GenerationStats, SamplingConfig, stream_text
from lmarch.generation.beam import beam_search_prompts, check_beam_sampling
from lmarch.generation.generate import check_prompt
from lmarch.generation.sampling import StopStringMatcher
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


def check_decoding(sampling: SamplingConfig, generation: GenerationConfig) -> None:
    """Refuse settings that do not go together (sampling options with beam search), before
    any model is loaded."""
    if generation.uses_beams:
        check_beam_sampling(sampling)


@dataclass(frozen=True)
class BeamText:
    """One beam-search result: its text (cut at the end token or a stop string, neither
    shown), its generated token ids (end token included) and its length-penalised score."""

    text: str
    token_ids: list[int]
    score: float


def beam_text(
    loaded: LoadedModel,
    prompt: str,
    generation: GenerationConfig,
    *,
    stats: GenerationStats | None = None,
) -> list[BeamText]:
    """The ``generation.num_return_sequences`` best continuations of the raw ``prompt`` by
    beam search (:mod:`lmarch.generation.beam`), best first; ``stats`` gets the best one's ids
    and the whole search's time as its decode time."""
    stats = stats if stats is not None else GenerationStats()
    ids = check_prompt(loaded.model, loaded.encode_prompt(prompt), generation.max_new_tokens)
    stats.prompt_tokens = len(ids)
    if generation.max_new_tokens == 0:
        return [BeamText("", [], 0.0)]
    stops = () if generation.ignore_eos else loaded.stop_token_ids
    t0 = time.perf_counter()
    found = beam_search_prompts(loaded.model, [ids], generation.beam_config(stops))[0]
    stats.decode_s = time.perf_counter() - t0
    matcher = StopStringMatcher(generation.stop)
    results = []
    for hyp in found:
        new = list(hyp.token_ids)
        ended = bool(new) and new[-1] in stops
        text = loaded.tokenizer.decode(new[:-1] if ended else new)
        cut = matcher.find(text)
        results.append(BeamText(text if cut is None else text[:cut], new, hyp.score))
        if len(results) == 1:
            stats.token_ids = new
            stats.stopped_by = "stop_string" if cut is not None else "eos" if ended else "length"
    return results
