"""The pieces of extractive question answering that do not train: windows over long contexts,
span labels from character offsets, span decoding, and SQuAD's exact match and F1.

Input (Devlin et al. 2019, sec. 4.2): ``[CLS] question [SEP] context [SEP]``, token type 0 up
to the first separator and 1 after it (RoBERTa: two separators and one type). A context longer
than the room left is read in windows, as BERT's SQuAD recipe does: the first window starts at
the first context token, each next one ``doc_stride`` tokens further, until one reaches the end.

Labels: the answer's characters ``[s, e)`` become the first and last context token whose
character span overlaps them (token offsets from the tokenizer). A window that does not hold the
whole answer is labelled with the [CLS] position 0 for both start and end ("no answer here").

Decoding: in every window, each pair of context tokens (i, j) with i <= j and j - i <
``max_answer_length`` scores start_logit[i] + end_logit[j]; the best pairs over all windows,
with their text cut from the context by character offsets, are the n-best answers (one per
distinct text), their probabilities a softmax over the n-best scores (BERT's
``nbest_predictions``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmarch.errors import LmarchError

CLS_POSITION = 0


@dataclass(frozen=True)
class Window:
    """One model input over a slice of a context: ``context_start`` is the position of its
    first context token, ``offsets[k]`` the characters of context token ``token_start + k``;
    ``start_position`` / ``end_position`` the label (0, the [CLS] position: no answer)."""

    example: int
    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    context_start: int
    token_start: int
    offsets: tuple[tuple[int, int], ...]
    start_position: int = CLS_POSITION
    end_position: int = CLS_POSITION


def token_offsets(tokenizer: object, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's character span: from the
    tokenizer's own ``encode_with_offsets`` (lmarch's WordPiece), else from the ``tokenizers``
    library's version of it (``to_hf_tokenizer``), checked to give the same ids."""
    own = getattr(tokenizer, "encode_with_offsets", None)
    if own is not None:
        return own(text)
    to_hf = getattr(tokenizer, "to_hf_tokenizer", None)
    if to_hf is not None:
        encoding = to_hf().encode(text, add_special_tokens=False)
        ids = list(encoding.ids)
        if ids == list(tokenizer.encode(text)):  # type: ignore[attr-defined]
            return ids, [tuple(o) for o in encoding.offsets]
    raise LmarchError(
        f"{type(tokenizer).__name__} gives no character offsets, which answer spans need",
        hint="use a WordPiece model (BERT, MiniLM, ELECTRA) or a folder with a tokenizer.json",
    )


def answer_token_span(
    offsets: Sequence[tuple[int, int]], start: int, end: int
) -> tuple[int, int] | None:
    """The first and last token whose characters overlap ``[start, end)`` (None if none do)."""
    inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return (inside[0], inside[-1]) if inside else None


def window_starts(n_tokens: int, room: int, doc_stride: int) -> list[tuple[int, int]]:
    """``(start, end)`` token ranges of the windows over ``n_tokens`` context tokens, ``room``
    tokens each at most, each ``doc_stride`` past the last, the final one reaching the end."""
    if room < 1 or doc_stride < 1:
        raise LmarchError("a window needs room for at least one context token and a stride >= 1")
    spans, start = [], 0
    while True:
        end = min(n_tokens, start + room)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start += min(end - start, doc_stride)


def make_windows(
    tokenizer: object,
    example: int,
    context: str,
    question: str,
    max_length: int,
    doc_stride: int,
    max_query_length: int,
    answer: tuple[int, int] | None = None,
) -> list[Window]:
    """The windows of one question over its context (see the module docstring); ``answer``
    (characters ``[start, end)`` of the context) sets the labels."""
    cls, sep = getattr(tokenizer, "cls_id", None), getattr(tokenizer, "sep_id", None)
    if cls is None or sep is None:
        raise LmarchError("this tokenizer has no CLS/SEP tokens to build model input from")
    separators = getattr(tokenizer, "pair_separators", 1)
    second_type = getattr(tokenizer, "second_segment_type", 1)
    query = list(tokenizer.encode(question))[:max_query_length]  # type: ignore[attr-defined]
    ids, offsets = token_offsets(tokenizer, context)
    room = max_length - len(query) - 2 - separators
    if room < 1:
        raise LmarchError(
            f"max_length {max_length} leaves no room for the context after a question of "
            f"{len(query)} tokens",
            hint="raise max_length or lower max_query_length",
        )
    span = None if answer is None else answer_token_span(offsets, *answer)
    head = [cls, *query, *[sep] * separators]
    types = [0] * (len(query) + 1 + separators)
    windows = []
    for start, end in window_starts(len(ids), room, doc_stride):
        start_pos = end_pos = CLS_POSITION
        if span is not None and start <= span[0] and span[1] < end:
            start_pos, end_pos = len(head) + span[0] - start, len(head) + span[1] - start
        windows.append(
            Window(
                example,
                tuple(head + ids[start:end] + [sep]),
                tuple(types + [second_type] * (end - start + 1)),
                len(head),
                start,
                tuple(offsets[start:end]),
                start_pos,
                end_pos,
            )  # fmt: skip
        )
    return windows


def decode_spans(
    context: str,
    windows: Sequence[Window],
    start_logits: Sequence[Tensor],
    end_logits: Sequence[Tensor],
    max_answer_length: int = 30,
    n_best: int = 20,
) -> list[dict]:
    """The ``n_best`` answers of one question (see the module docstring): each a dict with
    ``text``, ``start`` / ``end`` (characters of ``context``), ``score`` (start + end logit)
    and ``probability``, best first. A text found twice (two overlapping windows, or the same
    name at two places) is listed once, where it scores best, as BERT's n-best list does."""
    if max_answer_length < 1 or n_best < 1:
        raise LmarchError("max_answer_length and n_best must be >= 1")
    best: dict[tuple[int, int], float] = {}
    for window, s_logits, e_logits in zip(windows, start_logits, end_logits):
        n = len(window.offsets)
        if n == 0:
            continue
        lo = window.context_start
        s = s_logits[lo : lo + n].float()
        e = e_logits[lo : lo + n].float()
        scores = s[:, None] + e[None, :]
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        allowed = (j >= i) & (j - i < max_answer_length)
        scores = scores.masked_fill(~allowed, float("-inf")).flatten()
        order = torch.argsort(scores, descending=True)[: int(allowed.sum())].tolist()
        # a window's first n_best distinct texts are enough: a text among the n_best over
        # all windows is beaten, in its best window, by fewer than n_best other texts
        texts: set[str] = set()
        for flat in order:
            a, b = window.offsets[flat // n][0], window.offsets[flat % n][1]
            if context[a:b] in texts:
                continue
            texts.add(context[a:b])
            score = float(scores[flat])
            if score > best.get((a, b), float("-inf")):
                best[(a, b)] = score
            if len(texts) == n_best:
                break
    ranked, seen = [], set()
    for (a, b), score in sorted(best.items(), key=lambda item: (-item[1], item[0])):
        if context[a:b] not in seen and len(ranked) < n_best:  # one entry per answer text
            seen.add(context[a:b])
            ranked.append(((a, b), score))
    if not ranked:
        return []
    probs = torch.softmax(torch.tensor([score for _, score in ranked]), dim=0).tolist()
    return [
        {"text": context[a:b], "start": a, "end": b, "score": score, "probability": p}
        for ((a, b), score), p in zip(ranked, probs)
    ]


# --- SQuAD v1.1 scores --------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower-case, drop ASCII punctuation, drop the articles
    "a", "an", "the" as whole words, and collapse whitespace to single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truths: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised true answer, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(t) for t in truths))


def _f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, truths: Sequence[str]) -> float:
    """SQuAD's token F1, the best over the true answers: with the normalised words of each,
    common = |pred ∩ gold| (as multisets), P = common / |pred|, R = common / |gold|,
    F1 = 2PR / (P + R), and 0 when nothing is in common."""
    return max((_f1(prediction, t) for t in truths), default=0.0)


def squad_scores(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """``exact_match`` and ``f1`` over a set, in percent as SQuAD's script reports them."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} questions")
    n = max(len(predictions), 1)
    return {
        "exact_match": 100.0 * sum(exact_match(p, t) for p, t in zip(predictions, truths)) / n,
        "f1": 100.0 * sum(f1_score(p, t) for p, t in zip(predictions, truths)) / n,
        "n": len(predictions),
    }


__all__ = [
    "CLS_POSITION",
    "Window",
    "answer_token_span",
    "decode_spans",
    "exact_match",
    "f1_score",
    "make_windows",
    "normalize_answer",
    "squad_scores",
    "token_offsets",
    "window_starts",
]
