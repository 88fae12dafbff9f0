"""The pair-merge loop that byte-level BPE and WordPiece training share.

Byte-pair encoding as a vocabulary builder (Sennrich, Haddow and Birch 2016, "Neural Machine
Translation of Rare Words with Subword Units"): count how often every pair of neighbouring
symbols occurs in the training words, weighted by word frequency, fuse the most frequent pair into
a new symbol, and repeat. Byte-level BPE runs it on UTF-8 bytes (:mod:`lmarch.tokenizers.bpe`);
WordPiece, as the ``tokenizers`` library trains it, runs it on characters whose non-initial
copies carry the ``"##"`` prefix (:mod:`lmarch.tokenizers.wordpiece_train`). Only the start
(which symbols a word is made of) and the end (when to stop) differ, so the loop lives here once.

Each distinct word is a list of symbol ids. The loop keeps

- ``pair_counts``: how often each neighbouring pair occurs, weighted by word frequency,
- ``words_with``: for each pair, the words that hold it,
- a max-heap of ``(count, pair)`` entries that may go stale: when a pair's count drops its old
  entry stays, and is corrected when it reaches the top,

so a merge rewrites only the words holding the chosen pair and adjusts the counts of the pairs
those words lose and gain: a step costs time in proportion to the words it touches, not to the
corpus. The pair chosen is the one with the highest count; **ties go to the pair whose (left,
right) token strings sort first** (plain ``str`` order), so training is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import NamedTuple


class Merge(NamedTuple):
    """One step of training: the pair of token strings fused, and its weighted count."""

    left: str
    right: str
    count: int


def merge_pair(word: list[int], left: int, right: int, new: int) -> list[int]:
    """Replace each ``left right`` in ``word``, scanning left to right without overlap, by ``new``."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def iter_merges(
    words: Sequence[list[int]],
    freqs: Sequence[int],
    tokens: list[str],
    continuation_prefix: str = "",
) -> Iterator[Merge]:
    """Yield the most frequent pair, again and again, fusing it once the caller asks for more.

    ``words`` are lists of ids into ``tokens`` (id -> token string), each occurring ``freqs[i]``
    times. A :class:`Merge` is yielded *before* it is applied: the caller stops training by
    leaving the loop (for a count below a minimum frequency, or a full vocabulary), and nothing
    more is changed. Resuming applies it: the fused string — ``left + right`` with the right
    side's ``continuation_prefix`` dropped (WordPiece's ``"##"``; BPE has none) — gets the next id and is appended to ``tokens``, unless an earlier merge already
    spelled it (two pairs can spell one string; they share its id). ``tokens`` grows in place
    (``words`` is copied); the loop ends by itself when no pair is left.
    """
    words = list(words)
    cut = len(continuation_prefix)
    token_ids = {tok: i for i, tok in enumerate(tokens)}
    pair_counts: dict[tuple[int, int], int] = {}
    words_with: dict[tuple[int, int], set[int]] = {}
    for wi, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            words_with.setdefault(pair, set()).add(wi)
    # Max-heap via negated counts; the token strings break ties (smallest first).
    heap = [(-count, tokens[a], tokens[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    while heap:
        neg_count, left, right, a, b = heapq.heappop(heap)
        actual = pair_counts.get((a, b), 0)
        if actual != -neg_count:
            # Stale entry. Counts only rise with a fresh push, so a higher stale count just
            # needs re-queuing at its true value; a lower one has a newer entry already.
            if 0 < actual < -neg_count:
                heapq.heappush(heap, (-actual, left, right, a, b))
            continue
        yield Merge(left, right, actual)
        spelled = left + right[cut:]
        new = token_ids.setdefault(spelled, len(tokens))
        if new == len(tokens):
            tokens.append(spelled)
        touched: set[tuple[int, int]] = set()
        for wi in words_with.pop((a, b)):
            word = words[wi]
            merged = merge_pair(word, a, b, new)
            if len(merged) == len(word):
                continue  # the pair left this word through an earlier merge
            freq = freqs[wi]
            for pair in pairwise(word):
                pair_counts[pair] -= freq
            for pair in pairwise(merged):
                pair_counts[pair] = pair_counts.get(pair, 0) + freq
                if new in pair:  # only pairs with the new symbol can be new to this word
                    words_with.setdefault(pair, set()).add(wi)
                    touched.add(pair)
            words[wi] = merged
        del pair_counts[(a, b)]
        for pair in touched:
            heapq.heappush(heap, (-pair_counts[pair], tokens[pair[0]], tokens[pair[1]], *pair))
