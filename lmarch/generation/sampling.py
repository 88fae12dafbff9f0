"""Choosing the next token from a model's logits, and cutting generated text at stop strings.

Every function here is pure and works on a batch: ``logits`` has shape ``[B, V]`` (one row of
vocabulary scores per sequence). Filters return new logits in which the tokens they rule out are
set to ``-inf``, so that they can be chained and a final softmax gives them probability zero.

The order used by :func:`select_next_token` is the usual one (and that of Hugging Face's
``generate``): repetition penalty, then temperature, top-k, top-p and min-p, then sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.settings import setting

__all__ = [
    "SamplingConfig",
    "StopStringMatcher",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "process_logits",
    "select_next_token",
]

_REMOVED = float("-inf")


def apply_repetition_penalty(logits: Tensor, previous_ids: Tensor, penalty: float) -> Tensor:
    """Make tokens that already occur in ``previous_ids`` less likely (CTRL's repetition penalty).

    Keskar et al. 2019, "CTRL: A Conditional Transformer Language Model for Controllable
    Generation", section 4.1. For every token id ``i`` present in row ``b`` of ``previous_ids``
    (``[B, T]``), with penalty ``θ``::

        x[b, i] <- x[b, i] / θ   if x[b, i] > 0
        x[b, i] <- x[b, i] * θ   otherwise

    so that ``θ > 1`` lowers the token's score whatever its sign. A token is penalised once,
    however often it occurs. ``θ = 1`` leaves the logits as they are.
    """
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    seen = logits.gather(-1, previous_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, previous_ids, seen)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest-scoring tokens of each row (top-k sampling, Fan et al. 2018).

    Fan, Lewis and Dauphin 2018, "Hierarchical Neural Story Generation". Every token whose logit
    is below the ``k``-th largest of its row is set to ``-inf``; tokens tied with the ``k``-th
    are kept. ``k >= V`` keeps everything.
    """
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, _REMOVED)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of likeliest tokens
    whose total probability reaches ``p``.

    Holtzman, Buys, Du, Forbes and Choi 2020, "The Curious Case of Neural Text Degeneration".
    With the row's probabilities sorted in decreasing order ``π_1 >= π_2 >= ...``, token ``j``
    is kept when the mass of the tokens ranked before it, ``π_1 + ... + π_{j-1}``, is still
    below ``p``. The likeliest token is therefore always kept, and ``p = 1`` keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, _REMOVED)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Min-p filtering: keep tokens at least ``min_p`` times as likely as the likeliest one.

    Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM
    Outputs". Token ``i`` survives when ``π_i >= min_p * max_j π_j``; the threshold thus scales
    with the model's confidence. The likeliest token always survives.
    """
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, _REMOVED)


@dataclass
class SamplingConfig:
    """How to pick the next token.

    ``temperature == 0`` means greedy decoding (argmax, the other filters are then moot);
    ``None`` disables a filter. ``repetition_penalty`` is CTRL's ``θ`` (1 = off).
    """

    temperature: float = setting(1.0, "divide the logits by this; 0 means greedy decoding")
    top_k: int | None = setting(None, "keep the k likeliest tokens (k >= 1; unset: all)")
    top_p: float | None = setting(None, "nucleus sampling: keep the likeliest tokens up to mass p")
    min_p: float | None = setting(None, "drop tokens less likely than min_p * the likeliest")
    repetition_penalty: float = setting(1.0, "CTRL's penalty for tokens already seen (1: off)")

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LmarchError(
                f"temperature must be a finite number >= 0, got {self.temperature}",
                hint="0 picks the likeliest token; 0.7-1.0 are usual for sampling",
            )
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise LmarchError(
                f"top_k must be a whole number >= 1, got {self.top_k!r}",
                hint="leave it unset to disable top-k; 40-50 is common",
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LmarchError(
                f"top_p must lie in (0, 1], got {self.top_p}",
                hint="leave it unset to disable nucleus sampling; 0.9-0.95 is common",
            )
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise LmarchError(
                f"min_p must lie in [0, 1], got {self.min_p}",
                hint="leave it unset to disable min-p; 0.05-0.1 is common",
            )
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise LmarchError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty}",
                hint="1.0 disables it; 1.1-1.3 discourages repetition",
            )

    @property
    def greedy(self) -> bool:
        """Whether this configuration always picks the likeliest token."""
        return self.temperature == 0


def process_logits(
    logits: Tensor, config: SamplingConfig, previous_ids: Tensor | None = None
) -> Tensor:
    """The logits that :func:`select_next_token` samples from, in float32.

    Repetition penalty, then (unless greedy) division by the temperature, top-k, top-p, min-p.
    """
    logits = logits.float()
    if previous_ids is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, previous_ids, config.repetition_penalty)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k is not None:
        logits = apply_top_k(logits, config.top_k)
    if config.top_p is not None:
        logits = apply_top_p(logits, config.top_p)
    if config.min_p is not None:
        logits = apply_min_p(logits, config.min_p)
    return logits


def select_next_token(
    logits: Tensor,
    config: SamplingConfig,
    previous_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token id per row of ``logits`` (``[B, V]``), returning ``[B]`` (int64).

    Greedy decoding when ``config.temperature == 0``; otherwise a draw from
    ``softmax(process_logits(...))`` with ``torch.multinomial``, reproducible for a seeded
    ``generator``. ``previous_ids`` (``[B, T]``) feeds the repetition penalty.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")
    logits = process_logits(logits, config, previous_ids)
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class StopStringMatcher:
    """Finds stop strings in generated text and says how much of it is safe to stream.

    Typical use while decoding, with ``text`` the whole text generated so far::

        cut = matcher.feed(text)
        if cut is not None:      # a stop string begins at `cut`: emit text[:cut], stop
            ...
        safe = matcher.safe_prefix_len(text)   # emit text[:safe]; the rest may start a stop

    ``feed`` remembers the text of its previous call: while the text only grows by appending,
    just the new end is searched, and a stop string once found keeps being reported. A text
    that does not extend the previous one (say a last character re-decoded once its bytes are
    complete) is searched afresh.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise LmarchError(
                "stop strings must be non-empty text", hint="drop the empty stop string"
            )
        self.stop_strings: tuple[str, ...] = tuple(dict.fromkeys(stop_strings))
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._text = ""  # the text of the previous call to feed
        self._match: int | None = None

    def reset(self) -> None:
        """Forget earlier calls to :meth:`feed`, to match a new text."""
        self._text = ""
        self._match = None

    def find(self, text: str, start: int = 0) -> int | None:
        """Where the earliest stop string starting at or after ``start`` begins, or None."""
        hits = [i for s in self.stop_strings if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def feed(self, text_so_far: str) -> int | None:
        """The index at which the earliest stop string begins in ``text_so_far``, or None.

        When ``text_so_far`` extends the text of the previous call, only its end (where a stop
        string not seen before could lie) is searched, so streaming costs time proportional to
        the new text rather than to all of it.
        """
        if text_so_far.startswith(self._text):
            start = max(0, len(self._text) - self._longest + 1)
        else:
            start, self._match = 0, None
        if self._match is None:
            self._match = self.find(text_so_far, start)
        self._text = text_so_far
        return self._match

    def safe_prefix_len(self, text: str) -> int:
        """How many leading characters of ``text`` can be shown now.

        Up to the earliest stop string if one is present; otherwise everything but the longest
        suffix of ``text`` that is the beginning of some stop string (it may yet complete).
        """
        found = self.find(text)
        if found is not None:
            return found
        held = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return len(text) - held
