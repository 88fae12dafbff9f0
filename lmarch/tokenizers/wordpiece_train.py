"""WordPiece training: BPE-style pair merges over pieces marked with ``"##"``.

Each distinct word is a list of piece ids (its first character bare, the rest carrying the
continuation prefix), weighted by how often the word occurs; the merge loop is the one byte-level
BPE uses, :func:`lmarch.tokenizers.merges.iter_merges`, here on characters instead of bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from lmarch.tokenizers.merges import iter_merges


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
    for merge in iter_merges(words, freqs, tokens, continuation_prefix=prefix):
        if len(tokens) >= budget or merge.count < min_frequency:
            break  # full, or every other pair is at most this frequent
    return tokens
