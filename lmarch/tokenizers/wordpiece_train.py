"""The WordPiece training loop: BPE-style pair merges over pieces marked with ``"##"``.

Each distinct word is a list of piece ids, weighted by how often the word occurs. The loop keeps

- ``pair_counts``: how often each neighbouring pair occurs, weighted by word frequency,
- ``words_with``: for each pair, the words that hold it,
- a max-heap of ``(count, pair)`` entries allowed to go stale, corrected when they reach the top,

so a merge rewrites only the words holding the chosen pair (the scheme of
:mod:`lmarch.tokenizers.bpe`, on characters instead of bytes).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from itertools import pairwise


def learn_wordpiece_pieces(
    word_counts: Mapping[str, int], budget: int, min_frequency: int, prefix: str
) -> list[str]:
    """WordPiece's vocabulary (special tokens aside) learned from word counts, in order.

    The alphabet of the words in both forms (``c`` and ``prefix + c``, sorted by code point),
    then one new piece per merge of the most frequent neighbouring pair (ties: the pair whose
    token strings sort first), until there are ``budget`` tokens or the best pair occurs fewer
    than ``min_frequency`` times. This is BPE training (Sennrich et al. 2016) over pieces that
    carry the continuation prefix, as the ``tokenizers`` WordPiece trainer does.
    """
    alphabet = sorted({char for word in word_counts for char in word})
    tokens = [*alphabet, *(prefix + char for char in alphabet)]
    token_ids = {token: i for i, token in enumerate(tokens)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, freq in word_counts.items():
        if len(word) > 1:  # a single character has no pairs
            words.append([token_ids[word[0]], *(token_ids[prefix + c] for c in word[1:])])
            freqs.append(freq)

    pair_counts: dict[tuple[int, int], int] = {}
    words_with: dict[tuple[int, int], set[int]] = {}
    for wi, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            words_with.setdefault(pair, set()).add(wi)
    # Max-heap by count (negated); ties go to the pair whose token strings sort first.
    heap = [(-count, tokens[a], tokens[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    cut = len(prefix)
    while len(tokens) < budget and heap:
        neg_count, left, right, a, b = heapq.heappop(heap)
        actual = pair_counts.get((a, b), 0)
        if actual != -neg_count:  # stale: re-queue at the true (lower) count, if any is left
            if 0 < actual < -neg_count:
                heapq.heappush(heap, (-actual, left, right, a, b))
            continue
        if actual < min_frequency:
            break  # every other pair is at most this frequent
        merged = left + right[cut:]
        new = token_ids.setdefault(merged, len(tokens))
        if new == len(tokens):  # (two pairs can spell the same piece; they share its id)
            tokens.append(merged)
        touched: set[tuple[int, int]] = set()
        for wi in words_with.pop((a, b)):
            word = words[wi]
            out, i, n = [], 0, len(word)
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            if len(out) == n:
                continue  # an earlier merge took the pair out of this word
            freq = freqs[wi]
            for pair in pairwise(word):
                pair_counts[pair] -= freq
            for pair in pairwise(out):
                pair_counts[pair] = pair_counts.get(pair, 0) + freq
                if new in pair:
                    words_with.setdefault(pair, set()).add(wi)
                    touched.add(pair)
            words[wi] = out
        del pair_counts[(a, b)]
        for pair in touched:
            heapq.heappush(heap, (-pair_counts[pair], tokens[pair[0]], tokens[pair[1]], *pair))
    return tokens
