"""Noising objectives that pre-train encoder-decoders: T5's span corruption and BART's text
infilling with sentence permutation. Each turns a run of tokens into a ``(source, target)``
pair that :class:`lmarch.data.seq2seq.Seq2SeqBatches` pads into a seq2seq batch.

**Span corruption** (Raffel et al. 2020, sec. 3.1.4 and 3.3.4): of a sequence of L tokens,
N = round(0.15 L) are noise, in S = round(N / 3) spans (mean span length 3). As T5's
``random_spans_noise_mask`` does it, the N noise tokens are cut into S non-empty spans and the
L - N others into S non-empty gaps, each cut uniformly at random, and gaps and spans alternate,
a gap first. Each span is replaced in the input by one sentinel, the sentinels counting down
from the end of the vocabulary (``<extra_id_0>`` = V - 1, ``<extra_id_1>`` = V - 2, ...); the
target lists each sentinel followed by the span it hides, then EOS:

    x      = Thank you for inviting me to your party last week .
    input  = Thank you <X> me to your party <Y> week . </s>
    target = <X> for inviting <Y> last </s>

Every token of x is in exactly one of input and target (a partition).

**Text infilling** (Lewis et al. 2019, "BART", sec. 2.2): span lengths are drawn from
Poisson(lambda = 3) until they cover 30% of the tokens (the last one cut to fit); the spans are
laid over the sequence in order with uniformly random gaps between them; each span, whatever
its length, becomes one ``<mask>``, and a span of length 0 inserts a ``<mask>``. The model
must restore the original text, learning how many tokens a mask hides. Spans here are over
tokens (fairseq's BART starts them at word starts). **Sentence permutation** (sec. 2.2): the
text is split after each sentence-ending token and the sentences shuffled; it is applied
before infilling, and the target is the original, unpermuted text.

All randomness comes from a ``torch.Generator`` passed in: the same seed gives the same pairs.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmarch.data.seq2seq import Pair, Seq2SeqBatches, Seq2SeqSpecials
from lmarch.errors import LmarchError

NOISE_DENSITY = 0.15  # T5's span corruption
MEAN_NOISE_SPAN_LENGTH = 3.0
T5_EXTRA_IDS = 100  # sentinels in T5's vocabulary
MASK_RATIO = 0.3  # BART's text infilling
POISSON_LAMBDA = 3.0
SENTENCE_ENDS = (".", "!", "?")

# T5's spiece.model layout: <pad> 0 (also the decoder start), </s> 1, <unk> 2
T5_SPECIAL_PIECES: tuple[tuple[str, str], ...] = (
    ("<pad>", "control"),
    ("</s>", "control"),
    ("<unk>", "unknown"),
)


def sentinel_id(vocab_size: int, index: int) -> int:
    """Id of ``<extra_id_{index}>``: T5 counts its sentinels down from the last id."""
    return vocab_size - 1 - index


# ---- span corruption ----------------------------------------------------------------------


def random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """Lengths of a uniformly random split of ``n_items`` into ``n_segments`` non-empty parts
    (the n_segments - 1 cut points drawn without replacement from the n_items - 1 gaps)."""
    if not 1 <= n_segments <= n_items:
        raise ValueError(f"cannot cut {n_items} items into {n_segments} non-empty segments")
    cuts = (torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1).sort().values
    bounds = [0, *cuts.tolist(), n_items]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def span_counts(
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """``(noise tokens, noise spans)`` for a sequence of ``length`` (>= 2): N = round(density L)
    kept in [1, L - 1], S = round(N / mean) kept in [1, min(N, L - N)]."""
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_noise_span_length), 1), n_noise, length - n_noise)
    return n_noise, n_spans


def random_spans_noise_mask(
    length: int,
    generator: torch.Generator,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> torch.Tensor:
    """Boolean [length] mask, True at noise tokens: alternating non-noise and noise spans,
    non-noise first, with the counts of :func:`span_counts` (module docstring). A sequence of
    one token is treated as two, as T5 does, and its mask cut back."""
    full = max(length, 2)
    n_noise, n_spans = span_counts(full, noise_density, mean_noise_span_length)
    noise = random_segmentation(n_noise, n_spans, generator)
    keep = random_segmentation(full - n_noise, n_spans, generator)
    mask = torch.zeros(full, dtype=torch.bool)
    pos = 0
    for gap, span in zip(keep, noise, strict=True):
        pos += gap
        mask[pos : pos + span] = True
        pos += span
    return mask[:length]


def corrupt_spans(
    tokens: Sequence[int], noise_mask: torch.Tensor, vocab_size: int, eos_id: int
) -> Pair:
    """``(input, target)`` of span corruption for ``tokens`` and a noise mask: each run of
    noise tokens becomes the next sentinel in the input, and the target holds each sentinel
    followed by its run; both end with ``eos_id``."""
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    previous = False
    for token, noisy in zip(tokens, noise_mask.tolist(), strict=True):
        if noisy:
            if not previous:
                span += 1
                sentinel = sentinel_id(vocab_size, span)
                inputs.append(sentinel)
                targets.append(sentinel)
            targets.append(int(token))
        else:
            inputs.append(int(token))
        previous = noisy
    return [*inputs, eos_id], [*targets, eos_id]


def span_corruption_lengths(
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """``(input length, target length)`` after corrupting ``length`` tokens (EOS included):
    L - N + S + 1 and N + S + 1."""
    n_noise, n_spans = span_counts(max(length, 2), noise_density, mean_noise_span_length)
    return length - n_noise + n_spans + 1, n_noise + n_spans + 1


def span_corruption_window(
    max_input_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> int:
    """The most raw tokens whose corrupted input fits ``max_input_length`` (T5 picks its
    pre-training windows this way, so that inputs come out at 512)."""
    if max_input_length < 3:
        raise LmarchError(f"inputs of {max_input_length} tokens are too short for span corruption")
    length = 2
    while span_corruption_lengths(length + 1, noise_density, mean_noise_span_length)[0] <= (
        max_input_length
    ):
        length += 1
    return length


@dataclass(frozen=True)
class SpanCorruption:
    """T5's span corruption as a ``make_pair(tokens, generator)`` for
    :class:`~lmarch.data.seq2seq.Seq2SeqBatches`: raw tokens in, ``(input, target)`` out.
    Refuses a sequence that needs more than ``n_sentinels`` spans."""

    vocab_size: int
    eos_id: int
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
    n_sentinels: int = T5_EXTRA_IDS

    def __call__(self, tokens: Sequence[int], generator: torch.Generator) -> Pair:
        mask = random_spans_noise_mask(
            len(tokens), generator, self.noise_density, self.mean_noise_span_length
        )
        spans = int((mask[1:] & ~mask[:-1]).sum()) + int(mask[0])
        if spans > self.n_sentinels:
            raise LmarchError(
                f"{len(tokens)} tokens make {spans} noise spans, but the vocabulary has only "
                f"{self.n_sentinels} sentinels",
                hint="use shorter sequences (block_size)",
            )
        return corrupt_spans(tokens, mask, self.vocab_size, self.eos_id)


# ---- text infilling and sentence permutation ------------------------------------------------


def poisson_span_lengths(budget: int, generator: torch.Generator, lam: float) -> list[int]:
    """Span lengths ~ Poisson(``lam``), drawn until they sum to at least ``budget``, the last
    one cut so that they sum to ``budget`` exactly (zeros allowed: they insert a mask)."""
    lengths: list[int] = []
    total = 0
    while total < budget:
        draws = torch.poisson(torch.full((max(budget, 1),), lam), generator=generator)
        for value in draws.long().tolist():
            if total + value >= budget:
                lengths.append(budget - total)
                return lengths
            lengths.append(value)
            total += value
    return lengths


def infilling_spans(
    n_tokens: int,
    generator: torch.Generator,
    mask_ratio: float = MASK_RATIO,
    lam: float = POISSON_LAMBDA,
) -> list[tuple[int, int]]:
    """``(start, length)`` of each masked span over ``n_tokens``: ceil(ratio n) tokens in
    Poisson spans (:func:`poisson_span_lengths`), placed in order with the unmasked tokens
    shared among the k + 1 gaps uniformly at random (stars and bars)."""
    budget = math.ceil(n_tokens * mask_ratio)
    if budget == 0:
        return []
    lengths = poisson_span_lengths(budget, generator, lam)
    k, free = len(lengths), n_tokens - budget
    bars = torch.randperm(free + k, generator=generator)[:k].sort().values.tolist()
    spans, pos = [], 0
    for j, (bar, length) in enumerate(zip(bars, lengths, strict=True)):
        gap = bar - (bars[j - 1] + 1 if j else 0)
        pos += gap
        spans.append((pos, length))
        pos += length
    return spans


def fill_spans(tokens: Sequence[int], spans: Iterable[tuple[int, int]], mask_id: int) -> list[int]:
    """``tokens`` with each ``(start, length)`` span replaced by one ``mask_id`` (spans in
    order, not overlapping; length 0 inserts a mask before ``start``)."""
    out: list[int] = []
    pos = 0
    for start, length in spans:
        out.extend(tokens[pos:start])
        out.append(mask_id)
        pos = start + length
    out.extend(tokens[pos:])
    return [int(t) for t in out]


def split_sentences(tokens: Sequence[int], sentence_ends: set[int]) -> list[list[int]]:
    """``tokens`` cut after every token in ``sentence_ends`` (a trailing piece without an end
    is a sentence too)."""
    sentences: list[list[int]] = [[]]
    for token in tokens:
        sentences[-1].append(int(token))
        if token in sentence_ends:
            sentences.append([])
    return [s for s in sentences if s]


def permute_sentences(
    tokens: Sequence[int], sentence_ends: set[int], generator: torch.Generator
) -> list[int]:
    """The sentences of ``tokens`` (:func:`split_sentences`) in a uniformly random order."""
    sentences = split_sentences(tokens, sentence_ends)
    order = torch.randperm(len(sentences), generator=generator).tolist()
    return [t for i in order for t in sentences[i]]


def sentence_end_ids(tokenizer: Any) -> set[int]:
    """Ids whose text, trailing whitespace dropped, ends a sentence (``.``, ``!``, ``?``)."""
    ends = set()
    for i in range(tokenizer.vocab_size):
        try:
            text = tokenizer.decode([i]).rstrip()
        except Exception:  # an id without text of its own (a lone byte piece): not an end
            continue
        if text.endswith(SENTENCE_ENDS):
            ends.add(i)
    return ends


@dataclass(frozen=True)
class TextInfilling:
    """BART's noising as a ``make_pair(tokens, generator)``: sentence permutation (when
    ``sentence_ends`` is given), then text infilling; the input is wrapped in ``specials``
    and cut to ``max_length``, the target is the original tokens wrapped."""

    mask_id: int
    specials: Seq2SeqSpecials
    sentence_ends: frozenset[int] = frozenset()
    mask_ratio: float = MASK_RATIO
    poisson_lambda: float = POISSON_LAMBDA
    max_length: int | None = None

    def __call__(self, tokens: Sequence[int], generator: torch.Generator) -> Pair:
        noisy = list(tokens)
        if self.sentence_ends:
            noisy = permute_sentences(noisy, set(self.sentence_ends), generator)
        spans = infilling_spans(len(noisy), generator, self.mask_ratio, self.poisson_lambda)
        source = self.specials.wrap(fill_spans(noisy, spans, self.mask_id))
        if self.max_length is not None and len(source) > self.max_length:
            source = [*source[: self.max_length - 1], self.specials.eos_id]
        return source, self.specials.wrap(tokens)


# ---- token streams and vocabularies ---------------------------------------------------------


def noising_batches(
    tokenizer: Any,
    ids: Sequence[int],
    objective: str,
    specials: Seq2SeqSpecials,
    max_length: int,
    batch_size: int,
    seed: int,
    what: str = "text",
) -> Seq2SeqBatches:
    """Random seq2seq batches of ``objective`` (``span`` or ``denoise``) made from windows of
    the token stream ``ids``: windows as long as fit ``max_length`` once corrupted (span) or
    wrapped in ``specials`` (denoise). ``what`` names the stream in errors."""
    if objective == "span":
        window = span_corruption_window(max_length)
        n_sentinels = sentinel_count(tokenizer)
        spans = span_counts(window)[1]
        if n_sentinels < spans:
            raise LmarchError(
                f"span corruption of {window} tokens needs {spans} sentinels <extra_id_i> at the "
                f"end of the vocabulary; the tokenizer has {n_sentinels}",
                hint="a T5 preset's Unigram vocabulary has 100; or use a smaller block_size",
            )
        make: Any = SpanCorruption(tokenizer.vocab_size, specials.eos_id, n_sentinels=n_sentinels)
    elif objective == "denoise":
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None:
            raise LmarchError(
                f"denoising needs a mask token, and this {type(tokenizer).__name__} has none",
                hint="BART presets train a byte-level BPE with <mask>",
            )
        window = max_length - len(specials.wrap([]))
        ends = frozenset(sentence_end_ids(tokenizer))
        make = TextInfilling(mask_id, specials, ends, max_length=max_length)
    else:
        raise ValueError(f"no noising objective {objective!r}")
    windows = token_windows(ids, window) if window >= 2 else []
    if not windows:
        raise LmarchError(
            f"the {what} has only {len(ids)} tokens, too few for a window of {window}",
            hint="give more text or --set block_size=SMALLER",
        )
    return Seq2SeqBatches(windows, batch_size, specials, make, seed=seed, block_size=window)


def token_windows(ids: Sequence[int], length: int) -> list[list[int]]:
    """Consecutive windows of ``length`` tokens of a token stream (the last, shorter one kept
    when it holds at least half a window)."""
    if length < 2:
        raise ValueError(f"windows must hold at least 2 tokens, got {length}")
    ids = [int(i) for i in ids]
    windows = [ids[i : i + length] for i in range(0, len(ids), length)]
    if windows and len(windows[-1]) < max(2, length // 2):
        windows.pop()
    return windows


def with_extra_pieces(tokenizer: Any, pieces: Sequence[str]) -> Any:
    """A copy of a :class:`~lmarch.tokenizers.unigram.UnigramTokenizer` with ``pieces``
    appended as control pieces (never produced from text; dropped when decoding)."""
    from lmarch.tokenizers.unigram import UnigramTokenizer

    if not isinstance(tokenizer, UnigramTokenizer):
        raise LmarchError(
            f"extra special pieces can be added to a Unigram tokenizer only, not "
            f"{type(tokenizer).__name__}"
        )
    settings = tokenizer._settings()
    settings["charsmap"] = base64.b64decode(settings["charsmap"])
    extra = [(p, 0.0, "control") for p in pieces]
    return UnigramTokenizer([*tokenizer.pieces, *extra], **settings)


def add_sentinels(tokenizer: Any, n: int = T5_EXTRA_IDS) -> Any:
    """``tokenizer`` with T5's sentinels ``<extra_id_{n-1}> ... <extra_id_0>`` as its last ids
    (returned as it is when it has them already)."""
    size = tokenizer.vocab_size
    if tokenizer.token_to_id("<extra_id_0>") == size - 1:
        return tokenizer
    return with_extra_pieces(tokenizer, [f"<extra_id_{i}>" for i in reversed(range(n))])


def sentinel_count(tokenizer: Any) -> int:
    """How many ``<extra_id_i>`` sentinels sit at the end of ``tokenizer``'s vocabulary."""
    size, n = tokenizer.vocab_size, 0
    while n < size and tokenizer.token_to_id(f"<extra_id_{n}>") == sentinel_id(size, n):
        n += 1
    return n


def seq2seq_unigram(
    text: str, vocab_size: int, extra_ids: int = 0, mask_token: bool = False
) -> Any:
    """A Unigram vocabulary of ``vocab_size`` ids in T5's layout (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, byte fallback), with a ``<mask>`` control piece after them when asked and
    ``extra_ids`` sentinels at the end (T5: 100)."""
    from lmarch.tokenizers.unigram_train import train_unigram

    specials = T5_SPECIAL_PIECES + ((("<mask>", "control"),) if mask_token else ())
    tokenizer = train_unigram(
        text, vocab_size - extra_ids, byte_fallback=True, special_pieces=specials
    )
    return add_sentinels(tokenizer, extra_ids) if extra_ids else tokenizer


__all__ = [
    "MASK_RATIO",
    "MEAN_NOISE_SPAN_LENGTH",
    "NOISE_DENSITY",
    "POISSON_LAMBDA",
    "T5_EXTRA_IDS",
    "T5_SPECIAL_PIECES",
    "SpanCorruption",
    "TextInfilling",
    "add_sentinels",
    "corrupt_spans",
    "fill_spans",
    "infilling_spans",
    "noising_batches",
    "permute_sentences",
    "poisson_span_lengths",
    "random_segmentation",
    "random_spans_noise_mask",
    "sentence_end_ids",
    "sentinel_count",
    "sentinel_id",
    "seq2seq_unigram",
    "span_corruption_lengths",
    "span_corruption_window",
    "span_counts",
    "split_sentences",
    "token_windows",
    "with_extra_pieces",
]
