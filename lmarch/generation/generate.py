"""Autoregressive decoding: x_{t+1} ~ p(. | x_<=t), one token at a time.

With a KV cache the prompt is run once (prefill) and every later step feeds only the newest
token; without one (or past the model's position limit) each step re-runs the last
``max_positions`` tokens, as nanoGPT's ``generate`` does.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError, LmarchNotice
from lmarch.generation.beam import BeamSearchConfig
from lmarch.generation.sampling import SamplingConfig, StopStringMatcher, select_next_token
from lmarch.settings import setting
from lmarch.tokenizers.base import Tokenizer

GREEDY = SamplingConfig(temperature=0.0)
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CACHE_ROUNDING = 256  # compiled steps see cache sizes in these steps, so few shapes recompile


def compiled_step(model: nn.Module) -> nn.Module:
    """``torch.compile`` of ``model`` for one-token decode steps, made once per model.

    The step is called with a 0-d tensor position, so its shapes never change while a cache
    lives (the whole cache is attended to, masked), and one compiled graph serves every step.
    """
    step = _COMPILED_STEPS.get(model)
    if step is None:
        # Inductor checks the size and stride of every input in Python before each call by
        # default: ~370 tensors for SmolLM2, a third of the step's own time. Dynamo's guards
        # already verify them, so the asserts are switched off for this graph.
        step = torch.compile(model, dynamic=False, options={"size_asserts": False})
        _COMPILED_STEPS[model] = step
    return step


@torch.no_grad()
def iter_tokens(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    *,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token ids [B] for ``max_new_tokens`` steps, continuing ``input_ids`` [B, T].

    The model must provide ``forward(ids, cache=, start=, last_only=)``, ``make_cache`` and
    ``max_positions`` (every causal family in lmarch does). With ``compile`` the one-token
    steps run through :func:`compiled_step` (the prompt itself runs eagerly), except in a model
    with native decoder layers (``decodes_natively``, e.g. after ``--quant q4``): those already
    are one call per layer, and they run eagerly.
    """
    was_training = model.training
    model.eval()
    try:
        limit = model.max_positions
        ids = input_ids
        cache_len = min(limit, ids.shape[1] + max_new_tokens)
        if compile:
            cache_len = min(limit, -(-cache_len // CACHE_ROUNDING) * CACHE_ROUNDING)
        # a model whose layers decode natively (one call each) has nothing left to compile
        # that would pay for Dynamo's per-step guard check
        native = any(getattr(m, "decodes_natively", False) for m in model.modules())
        step_fn = compiled_step(model) if compile and use_cache and not native else None
        cache = model.make_cache(ids.shape[0], cache_len) if use_cache else None
        if cache is not None and ids.shape[1] > cache_len:
            cache = None  # the prompt alone overflows the window: fall back to cropping
        logits = model(ids[:, -limit:], cache=cache, start=0, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            next_ids = select_next_token(logits, sampling, ids, generator)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            yield next_ids
            if step == max_new_tokens - 1:
                break
            if cache is not None and ids.shape[1] <= cache_len:
                # the newest token as a fresh [B, 1] tensor: a view into ``ids`` would change
                # strides every step, and a compiled step would recompile for each new stride
                last = next_ids.reshape(-1, 1).contiguous()
                if step_fn is not None:
                    position = torch.tensor(ids.shape[1] - 1, device=ids.device)
                    logits = step_fn(last, cache=cache, start=position)[:, -1]
                else:
                    logits = model(last, cache=cache, start=ids.shape[1] - 1)[:, -1]
            else:
                cache = None
                logits = model(ids[:, -limit:], start=0, last_only=True)[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    *,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> Tensor:
    """``input_ids`` [B, T] followed by up to ``max_new_tokens`` generated ids.

    Rows that produce ``eos_token_id`` are padded with it afterwards; generation stops early
    once every row has.
    """
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for next_ids in iter_tokens(
        model, input_ids, max_new_tokens, sampling, generator=generator, use_cache=use_cache
    ):
        if eos_token_id is not None:
            next_ids = torch.where(done, torch.full_like(next_ids, eos_token_id), next_ids)
            done |= next_ids == eos_token_id
        out.append(next_ids[:, None])
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.cat(out, dim=1)


@dataclass
class GenerationConfig:
    """How much to generate and where to stop; what to pick at each step is
    :class:`~lmarch.generation.sampling.SamplingConfig`'s business."""

    max_new_tokens: int = setting(128, "tokens to generate at most (0 only reads the prompt)")
    seed: int | None = setting(None, "random seed, for reproducible samples")
    stop: tuple[str, ...] = setting((), "stop at this text, not shown (repeatable)")
    ignore_eos: bool = setting(False, "keep generating past the end-of-text token")
    num_beams: int = setting(1, "beam search with this many beams (1: greedy or sampling)")
    num_return_sequences: int = setting(1, "beam search: how many of the best beams to show")
    length_penalty: float = setting(
        1.0, "beam search: rank by log p / length ** this (> 0 favours longer text)"
    )
    early_stopping: str = setting(
        "false", "beam search: true, false or never (when a prompt's beams are done)"
    )
    no_repeat_ngram_size: int = setting(0, "beam search: never repeat an n-gram this long")
    min_new_tokens: int = setting(0, "beam search: no end of text before this many tokens")

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise LmarchError(
                f"max_new_tokens must be an integer >= 0, got {n!r}",
                hint="e.g. --max-new-tokens 128",
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise LmarchError(f"seed must be an integer, got {self.seed!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        StopStringMatcher(self.stop)  # refuses an empty stop string
        self.early_stopping = str(self.early_stopping).lower()  # True (library) -> "true"
        self.beam_config(())  # checks the beam settings' values
        if self.num_beams == 1:
            moot = [name for name, default in _BEAM_ONLY.items() if getattr(self, name) != default]
            if moot:
                raise LmarchError(
                    f"{', '.join(moot)} apply to beam search only",
                    hint="add --num-beams N (N >= 2), or drop them",
                )

    @property
    def uses_beams(self) -> bool:
        """Whether this asks for beam search."""
        return self.num_beams > 1

    def beam_config(
        self, eos_token_ids: Sequence[int], pad_token_id: int | None = None
    ) -> BeamSearchConfig:
        """These settings as a :class:`~lmarch.generation.beam.BeamSearchConfig` (which checks
        them), ending at ``eos_token_ids`` unless ``ignore_eos``."""
        stopping = {"true": True, "false": False, "never": "never"}.get(self.early_stopping)
        if stopping is None:
            raise LmarchError(
                f"early_stopping must be true, false or never, got {self.early_stopping!r}"
            )
        return BeamSearchConfig(
            num_beams=self.num_beams,
            max_new_tokens=max(1, self.max_new_tokens),
            min_new_tokens=self.min_new_tokens,
            length_penalty=float(self.length_penalty),
            early_stopping=stopping,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            num_return_sequences=self.num_return_sequences,
            eos_token_id=None if self.ignore_eos else tuple(eos_token_ids),
            pad_token_id=pad_token_id,
        )


# GenerationConfig's fields that only beam search uses, with their defaults
_BEAM_ONLY = {
    "num_return_sequences": 1,
    "length_penalty": 1.0,
    "early_stopping": "false",
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
}
BEAM_SETTINGS = ("num_beams", *_BEAM_ONLY)  # for commands that do not beam-search (chat)


@dataclass
class GenerationStats:
    """What one call of :func:`stream_text` did: ids and timings (prefill = the prompt's
    forward pass up to the first new token; decode = every later token)."""

    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_by: str = "length"  # "length", "eos" or "stop_string"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first new token is timed with the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def check_prompt(model: nn.Module, prompt_ids: list[int], max_new_tokens: int = 0) -> list[int]:
    """The prompt's ids as the model can take them: refused when empty or when an id lies
    outside the model's vocabulary (a tokenizer that is not the model's), and, when longer than
    the context ``model.max_positions``, cut to its last tokens with a
    :class:`~lmarch.errors.LmarchNotice`. The cut leaves room for ``max_new_tokens`` (at least
    one prompt token is kept): a prompt that filled the whole window would make every new token
    a full-window forward pass instead of one cached step."""
    if not prompt_ids:
        raise LmarchError("the prompt is empty: it encodes to no tokens", hint="give some text")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max(prompt_ids)
    if vocab is not None and (top >= vocab or min(prompt_ids) < 0):
        raise LmarchError(
            f"the tokenizer gave token id {top}, but the model has only {vocab} ids",
            hint="the tokenizer does not belong to this model",
        )
    window = model.max_positions
    if len(prompt_ids) > window:
        keep = max(1, window - max_new_tokens)
        room = f", leaving room for {window - keep} new" if keep < window else ""
        warnings.warn(
            f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
            f"{window}: only its last {keep} tokens are kept{room}",
            LmarchNotice,
            stacklevel=3,
        )
        prompt_ids = prompt_ids[-keep:]
    return prompt_ids


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    *,
    stop: Sequence[str] = (),
    seed: int | None = None,
    stop_token_ids: Collection[int] = (),
    stats: GenerationStats | None = None,
    device: torch.device | str = "cpu",
    compile: bool = False,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` (text, or token ids) as text pieces, as soon as they
    are safe to show.

    Text is held back while it could still be the start of a stop string, or while the last
    token ends inside a multi-byte character (its decoding ends in U+FFFD). Generation ends at
    a token of ``stop_token_ids`` (end of turn / text; not shown) or at the first stop string
    (not shown). ``stats``, if given, is filled in as generation goes. The prompt is checked
    and, if longer than the context, cut by :func:`check_prompt` (``stats.prompt_tokens`` is
    then what was kept).
    """
    stats = stats if stats is not None else GenerationStats()
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    prompt_ids = check_prompt(
        model, tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt), max_new_tokens
    )
    stats.prompt_tokens = len(prompt_ids)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    matcher = StopStringMatcher(list(stop))
    shown = 0
    text = ""
    t0 = time.perf_counter()
    for next_ids in iter_tokens(
        model, ids, max_new_tokens, sampling, generator=generator, compile=compile
    ):
        now = time.perf_counter()
        if not stats.token_ids:
            stats.prefill_s = now - t0
        else:
            stats.decode_s = now - t0 - stats.prefill_s
        token = int(next_ids[0])
        stats.token_ids.append(token)
        if token in stop_token_ids:
            stats.stopped_by = "eos"
            break
        text = tokenizer.decode(stats.token_ids)
        cut = matcher.feed(text)
        if cut is not None:
            stats.stopped_by = "stop_string"
            if cut > shown:
                yield text[shown:cut]
            return
        if text.endswith("\ufffd"):
            continue
        safe = matcher.safe_prefix_len(text)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if len(text) > shown:
        yield text[shown:]
