"""The shared pair-merge loop on Sennrich et al.'s (2016) toy vocabulary, worked by hand."""

from __future__ import annotations

from lmarch.tokenizers.merges import iter_merges, merge_pair

WORDS = {"low": 5, "lower": 2, "newest": 6, "widest": 3}


def _start(prefix: str = "") -> tuple[list[list[int]], list[int], list[str]]:
    alphabet = sorted(set("".join(WORDS)))
    tokens = [*alphabet, *(prefix + c for c in alphabet)] if prefix else list(alphabet)
    ids = {t: i for i, t in enumerate(tokens)}
    words = [[ids[w[0]], *(ids[prefix + c] for c in w[1:])] for w in WORDS]
    return words, list(WORDS.values()), tokens


def test_merges_follow_counts_and_string_order() -> None:
    """Counts by hand: es = st = 9 (newest 6 + widest 3), 'e s' sorts first; then est 9;
    lo = ow = 7; then ew 6 (we fell to 2 once 'es' took newest's e); then the tie
    (ew, est) vs (n, ew) at 6 goes to 'ew' < 'n'. Every pair is merged before the loop ends."""
    words, freqs, tokens = _start()
    merges = [tuple(m) for m in iter_merges(words, freqs, tokens)]
    assert merges[:7] == [
        ("e", "s", 9), ("es", "t", 9), ("l", "o", 7), ("lo", "w", 7),
        ("e", "w", 6), ("ew", "est", 6), ("n", "ewest", 6),
    ]  # fmt: skip
    assert merges[-1] == ("low", "er", 2)
    assert {"newest", "widest", "lower"} <= set(tokens)


def test_stopping_early_applies_nothing_more_and_prefix_is_dropped() -> None:
    """Leaving the loop at a yielded merge (count 6 < 7) applies nothing more; with a
    continuation prefix the right side's '##' is dropped from the fused piece."""
    words, freqs, tokens = _start("##")
    n_start = len(tokens)
    for merge in iter_merges(words, freqs, tokens, continuation_prefix="##"):
        if merge.count < 7:
            break
    # '##o ##w' now sorts before 'l ##o' ('#' < 'l'), so 'low' is built from the right
    assert tokens[n_start:] == ["##es", "##est", "##ow", "low"]


def test_merge_pair_scans_left_to_right_without_overlap() -> None:
    assert merge_pair([1, 1, 1, 2, 1, 1], 1, 1, 9) == [9, 1, 2, 9]
