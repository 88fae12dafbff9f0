r"""Training a Unigram vocabulary: EM over the segmentation lattice, with pruning (Kudo 2018).

The steps follow sentencepiece 0.2's ``unigram::Trainer``:

1. **Text.** Each line is normalised as the tokenizer will normalise it (NFKC, ``▁`` for spaces
   and in front of the line) and cut into words at each ``▁``. Characters are kept in order of
   frequency until they cover ``character_coverage`` of the text; words holding a rarer character
   are left out of training (sentencepiece keeps them with the character marked unknown).
2. **Seed vocabulary.** Every character, then the most frequent substrings of words: up to
   ``max_piece_length`` characters, seen at least twice, ``▁`` only in front, one script class
   (letters of one script, digits, or other symbols: a piece never mixes them), ranked by
   frequency x length. sentencepiece enumerates them with a suffix array over the whole text;
   counting the substrings of each distinct word, weighted by its count, gives the same counts
   for pieces that cannot cross a ``▁``. Each seed starts with log-probability
   :math:`\log(\text{score} / \sum \text{scores})`.
3. **EM.** The E step runs forward-backward over each word's lattice (every vocabulary piece
   matching at each position) and adds up each piece's expected count
   :math:`E[c(x)] = \sum_{w} f_w \sum_{\text{edges of } x} \alpha\, p(x)\, \beta / Z_w`;
   the M step drops pieces expected fewer than 0.5 times and sets, as sentencepiece's
   "Bayesianified" EM does, :math:`\log p(x) = \psi(E[c(x)]) - \psi(\sum_y E[c(y)])` with the
   digamma function :math:`\psi`. Two EM steps run between prunings.
4. **Pruning.** For each piece, its best segmentation without itself is found; the loss of
   removing it is :math:`F(x)\,[\log p(x) - \sum_{y \in \text{alt}(x)} \log p'(y)]`, where
   :math:`F(x)` is its share of the Viterbi segmentations of the text and :math:`p'` the
   probabilities after its count moves to its alternatives. Pieces whose own Viterbi path is
   split are dropped; the rest are kept by loss, 75% per round, until at most 1.1 x
   ``vocab_size`` are left. Single characters are always kept.
5. **Final vocabulary.** All kept characters, then the pieces of highest log-probability up to
   ``vocab_size`` ids in all, after the special pieces (and the 256 ``<0xNN>`` pieces with byte
   fallback), in order of score.

Every lattice pass is vectorised over all words at once with numpy: the lattice edges are
arrays, and the forward and backward recursions advance one character position at a time.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmarch.errors import LmarchError
from lmarch.tokenizers.unigram import UnigramTokenizer, _byte_piece
from lmarch.tokenizers.unigram_normalize import _CONTROL, SPACE_SYMBOL, SentencePieceNormalizer

DEFAULT_SPECIAL_PIECES: tuple[tuple[str, str], ...] = (
    ("<unk>", "unknown"),
    ("<s>", "control"),
    ("</s>", "control"),
)
"""sentencepiece's default layout: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2."""
ALBERT_SPECIAL_PIECES: tuple[tuple[str, str], ...] = (
    ("<pad>", "control"),
    ("<unk>", "unknown"),
    ("[CLS]", "control"),
    ("[SEP]", "control"),
    ("[MASK]", "user_defined"),
)
"""ALBERT's ``spiece.model`` layout: ``<pad>`` 0, ``<unk>`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4."""


def digamma(x: np.ndarray) -> np.ndarray:
    """The digamma function by recurrence and asymptotic series (sentencepiece's own)."""
    x = np.asarray(x, dtype=np.float64).copy()
    result = np.zeros_like(x)
    small = x < 7
    while small.any():
        result[small] -= 1.0 / x[small]
        x[small] += 1.0
        small = x < 7
    x -= 0.5
    xx = 1.0 / x
    xx2 = xx * xx
    xx4 = xx2 * xx2
    return (
        result
        + np.log(x)
        + xx2 / 24.0
        - 7.0 / 960.0 * xx4
        + 31.0 / 8064.0 * xx4 * xx2
        - 127.0 / 30720.0 * xx4 * xx4
    )


def _script_class(char: str, cache: dict[str, str]) -> str:
    """A stand-in for the Unicode script: ``digit``, the first word of a letter's or mark's
    Unicode name (``LATIN``, ``GREEK`` ...; Hiragana, Katakana and CJK count as one, as
    sentencepiece merges them into Han) or ``other``."""
    found = cache.get(char)
    if found is None:
        category = unicodedata.category(char)
        if category == "Nd":
            found = "digit"
        elif category[0] in "LM":
            head = unicodedata.name(char, "OTHER").split(" ")[0]
            found = "HAN" if head in ("CJK", "HIRAGANA", "KATAKANA") else head
        else:
            found = "other"
        cache[char] = found
    return found


class _Lattice:
    """All lattice edges of a set of strings against a fixed piece list, as flat arrays.

    Positions of string ``k`` are ``offset[k] .. offset[k] + length[k]`` in one flat array;
    an edge goes from string position ``start`` to ``end`` with piece ``piece``. Edges are kept
    in forward order (by end, then string); ``bwd_order`` lists them by start.
    """

    def __init__(self, strings: Sequence[str], piece_ids: dict[str, int], max_len: int) -> None:
        lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
        self.offset = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
        self.length = lengths
        self.size = int((lengths + 1).sum())
        # every prefix of a piece, so that a scan stops as soon as no piece can match
        prefixes: dict[str, int] = {}
        for piece in piece_ids:
            for j in range(1, len(piece)):
                prefixes.setdefault(piece[:j], -1)
        prefixes.update(piece_ids)
        word, start, end, piece = [], [], [], []
        for k, s in enumerate(strings):
            n = len(s)
            for i in range(n):
                for j in range(i + 1, min(n, i + max_len) + 1):
                    idx = prefixes.get(s[i:j])
                    if idx is None:
                        break
                    if idx >= 0:
                        word.append(k)
                        start.append(i)
                        end.append(j)
                        piece.append(idx)
        arrays = [np.asarray(a, dtype=np.int64) for a in (word, start, end, piece)]
        # kept in forward order (by end position, then by target); the backward order apart
        fwd = np.lexsort((arrays[0], arrays[2]))
        self.word, self.start, self.end, self.piece = (a[fwd] for a in arrays)
        self.bwd_order = np.lexsort((self.word, self.start))

    def select(self, keep: np.ndarray) -> _EdgeSet:
        """The edges where ``keep`` is true, ordered for the passes."""
        return _EdgeSet(self, keep)


class _EdgeSet:
    def __init__(self, lattice: _Lattice, keep: np.ndarray) -> None:
        self.lat = lattice
        word = lattice.word[keep]
        self.src = lattice.offset[word] + lattice.start[keep]
        self.dst = lattice.offset[word] + lattice.end[keep]
        self.piece = lattice.piece[keep]
        self.word = word
        n = len(word)
        self.fwd = _layers(np.arange(n), lattice.end[keep], self.dst)
        position = np.cumsum(keep) - 1  # lattice edge -> index among the kept ones
        order = position[lattice.bwd_order[keep[lattice.bwd_order]]]
        self.bwd = _layers(order, lattice.start[keep][order], self.src[order])[::-1]

    def _pass(self, layers, logp, values, read, write, reduce) -> np.ndarray | None:
        back = np.full(self.lat.size, -1, dtype=np.int64) if reduce == "max" else None
        for order, bounds in layers:
            scores = values[read[order]] + logp[self.piece[order]]
            targets = write[order]
            if reduce == "lse":
                top = np.maximum.reduceat(scores, bounds)
                safe = np.where(np.isfinite(top), top, 0.0)
                total = np.add.reduceat(
                    np.exp(scores - np.repeat(safe, np.diff(_ends(bounds, len(scores))))), bounds
                )
                values[targets[bounds]] = safe + np.log(total)
            else:
                top = np.maximum.reduceat(scores, bounds)
                values[targets[bounds]] = top
                hit = scores == np.repeat(top, np.diff(_ends(bounds, len(scores))))
                position = np.where(hit, np.arange(len(scores)), len(scores))
                first = np.minimum.reduceat(position, bounds)
                back[targets[bounds]] = order[first]  # type: ignore[index]
        return back

    def forward(self, logp: np.ndarray, reduce: str = "lse") -> tuple[np.ndarray, Any]:
        alpha = np.full(self.lat.size, -np.inf)
        alpha[self.lat.offset] = 0.0
        back = self._pass(self.fwd, logp, alpha, self.src, self.dst, reduce)
        return alpha, back

    def backward(self, logp: np.ndarray) -> np.ndarray:
        beta = np.full(self.lat.size, -np.inf)
        beta[self.lat.offset + self.lat.length] = 0.0
        self._pass(self.bwd, logp, beta, self.dst, self.src, "lse")
        return beta

    def expected_counts(
        self, logp: np.ndarray, weights: np.ndarray, n_pieces: int
    ) -> tuple[np.ndarray, float]:
        """Each piece's expected count over the strings weighted by ``weights``, and the
        weighted log-likelihood."""
        alpha, _ = self.forward(logp)
        beta = self.backward(logp)
        z = alpha[self.lat.offset + self.lat.length]
        post = np.exp(alpha[self.src] + logp[self.piece] + beta[self.dst] - z[self.word])
        counts = np.bincount(self.piece, weights=post * weights[self.word], minlength=n_pieces)
        return counts, float((weights * z).sum())

    def viterbi(self, logp: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Best path score of each string and, per step back from the end, the piece taken
        (``-1`` once a string is done)."""
        alpha, back = self.forward(logp, "max")
        ends = self.lat.offset + self.lat.length
        best = alpha[ends]
        steps = []
        cur = ends.copy()
        reached = np.isfinite(best)
        alive = (cur > self.lat.offset) & reached
        while alive.any():
            edge = back[cur[alive]]
            taken = np.full(len(cur), -1, dtype=np.int64)
            taken[alive] = self.piece[edge]
            steps.append(taken)
            cur[alive] = self.src[edge]
            alive = (cur > self.lat.offset) & reached
        return best, steps


def _ends(bounds: np.ndarray, n: int) -> np.ndarray:
    return np.append(bounds, n)


def _layers(
    order: np.ndarray, position: np.ndarray, target: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Edge indices ``order``, already sorted by ``position`` then ``target`` (both given in
    that order), cut into one group per position, each with the starts of its runs of equal
    targets."""
    out = []
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(position)) + 1, [len(order)]])
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b > a:
            tgt = target[a:b]
            bounds = np.concatenate([[0], np.flatnonzero(np.diff(tgt)) + 1])
            out.append((order[a:b], bounds))
    return out


_END = "\0"  # what follows the last word of a line


def _words_and_chars(
    text: str, normalizer: SentencePieceNormalizer, coverage: float
) -> tuple[Counter[str], Counter[str], list[tuple[str, int]]]:
    """Word counts of the normalised lines (words holding a character outside the coverage
    left out), the same words with what follows each (``▁``, or ``\\0`` after a line's last
    word), and the kept characters with their counts, most frequent first."""
    # the whole text through NFKC at once, then each line's whitespace: what the normaliser
    # does line by line (nfkc_rule, then remove_extra_whitespaces), in one pass
    del normalizer
    text = unicodedata.normalize("NFKC", text)
    lines = Counter(_CONTROL.sub("", line) for line in text.split("\n"))
    followed: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    for line, count in lines.items():
        parts = line.split()
        for k, chunk in enumerate(parts):
            end = _END if k == len(parts) - 1 else SPACE_SYMBOL
            followed[SPACE_SYMBOL + chunk + end] += count
    for word, count in followed.items():
        for char in word[:-1]:
            chars[char] += count
    total = sum(chars.values())
    kept: list[tuple[str, int]] = []
    covered = 0
    for char, count in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])):
        if total and covered / total >= coverage:
            break
        covered += count
        kept.append((char, count))
    allowed = {c for c, _ in kept}
    followed = Counter({w: c for w, c in followed.items() if set(w[:-1]) <= allowed})
    words: Counter[str] = Counter()
    for word, count in followed.items():
        words[word[:-1]] += count
    return words, followed, kept


def _seed_pieces(
    followed: Counter[str], chars: list[tuple[str, int]], max_len: int, seed_size: int
) -> list[tuple[str, float]]:
    """Characters and frequent substrings with their seed scores (module docstring, step 2).

    As in a suffix array's enumeration, a substring is a candidate only where it branches: not
    every one of its occurrences is followed by the same character (the word's end counts as a
    ``▁``, a line's end as another mark), since otherwise its one-longer extension is seen
    exactly as often.
    """
    scripts: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for word, count in followed.items():
        n = len(word)
        for i in range(n - 1):
            for j in range(i + 2, min(n, i + max_len + 1) + 1):
                counts[word[i:j]] += count
    widest: dict[str, int] = {}
    for sub, count in counts.items():
        if len(sub) >= 3:
            parent = sub[:-1]
            if count > widest.get(parent, 0):
                widest[parent] = count
    candidates = []
    for sub, count in counts.items():
        if count < 2 or len(sub) > max_len or widest.get(sub, 0) >= count:
            continue
        if sub[-1] in (SPACE_SYMBOL, _END) or SPACE_SYMBOL in sub[1:]:
            continue
        classes = {_script_class(c, scripts) for c in sub if c != SPACE_SYMBOL}
        if len(classes) == 1:
            candidates.append((sub, count * len(sub)))
    seeds = [(c, float(n)) for c, n in chars]
    candidates.sort(key=lambda kv: (-kv[1], kv[0]))
    seeds += [(s, float(score)) for s, score in candidates[: max(0, seed_size - len(seeds))]]
    return seeds


def train_unigram(
    text: str,
    vocab_size: int,
    *,
    byte_fallback: bool = False,
    special_pieces: Sequence[tuple[str, str]] = DEFAULT_SPECIAL_PIECES,
    character_coverage: float = 0.9995,
    max_piece_length: int = 16,
    seed_size: int = 1_000_000,
    shrinking_factor: float = 0.75,
    num_sub_iterations: int = 2,
    roles: dict[str, str] | None = None,
    log: Any = None,
) -> UnigramTokenizer:
    """A Unigram tokenizer of ``vocab_size`` pieces learned from ``text`` (module docstring),
    or fewer when EM keeps fewer (sentencepiece refuses that case; here the smaller vocabulary
    is returned: the 38 plays give 23,369 pieces when 30,000 are asked for).

    ``special_pieces`` are ``(piece, type)`` pairs placed first (exactly one of type
    ``unknown``; ``control`` and ``user_defined`` for the rest), then the byte pieces with
    ``byte_fallback``, then the learned pieces by score. The tokenizer normalises with NFKC
    (``normalization="nfkc"``). ``log`` (a ``print``-like callable) reports each round.
    """
    special = [(p, kind) for p, kind in special_pieces]
    meta = len(special) + (256 if byte_fallback else 0)
    if type(vocab_size) is not int or vocab_size <= meta:
        raise LmarchError(
            f"vocab_size {vocab_size!r} leaves no room for learned pieces "
            f"({meta} special{' and byte' if byte_fallback else ''} pieces come first)"
        )
    if not 0.0 < character_coverage <= 1.0:
        raise LmarchError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if not 0.0 < shrinking_factor < 1.0:
        raise LmarchError(f"shrinking_factor must be in (0, 1), got {shrinking_factor}")
    users = [p for p, kind in special if kind == "user_defined"]
    normalizer = SentencePieceNormalizer(None, "nfkc", users)
    words, followed, chars = _words_and_chars(text, normalizer, character_coverage)
    if not words:
        raise LmarchError("no text to train a Unigram vocabulary on")
    seeds = _seed_pieces(followed, chars, max_piece_length, seed_size)
    names = [s for s, _ in seeds]
    n = len(names)
    ids = {s: i for i, s in enumerate(names)}
    is_char = np.zeros(n, dtype=bool)
    is_char[: len(chars)] = True
    score = np.array([sc for _, sc in seeds])
    logp = np.log(score) - math.log(score.sum())
    alive = np.ones(n, dtype=bool)

    word_list = list(words)
    weights = np.array([words[w] for w in word_list], dtype=np.float64)
    lattice = _Lattice(word_list, ids, max_piece_length)
    inner = _Lattice(names, ids, max_piece_length)  # each piece segmented by the others
    whole = (inner.start == 0) & (inner.end == inner.length[inner.word])
    desired = int(vocab_size * 1.1)
    say = log or (lambda *_: None)

    while True:
        edges = lattice.select(alive[lattice.piece])
        for _ in range(num_sub_iterations):
            counts, loglik = edges.expected_counts(np.where(alive, logp, -np.inf), weights, n)
            counts = np.where(is_char, np.maximum(counts, 0.5), counts)  # characters stay
            alive &= counts >= 0.5
            total = counts[alive].sum()
            logp = np.where(alive, digamma(np.maximum(counts, 0.5)) - digamma(total), -np.inf)
            edges = lattice.select(alive[lattice.piece])
            say(f"EM: {int(alive.sum())} pieces, log-likelihood {loglik / weights.sum():.4f}")
        if alive.sum() <= desired:
            break
        alive = _prune(
            alive, logp, is_char, edges, inner, whole, weights, desired, shrinking_factor
        )

    learned = vocab_size - meta
    final: dict[str, float] = {}
    min_score = float(logp[alive].min())
    penalty = 0.0
    for i in range(len(chars)):  # characters first, most frequent first
        if alive[i]:
            final[names[i]] = float(logp[i])
        else:
            final[names[i]] = min_score + penalty
            penalty += 0.0001
    for i in sorted(np.flatnonzero(alive), key=lambda i: (-logp[i], names[i])):
        if len(final) >= learned:
            break
        final.setdefault(names[i], float(logp[i]))
    pieces: list[tuple[str, float, str]] = [(p, 0.0, kind) for p, kind in special]
    if byte_fallback:
        pieces += [(_byte_piece(b), 0.0, "byte") for b in range(256)]
    taken = {p for p, _, _ in pieces}
    ranked = sorted(final.items(), key=lambda kv: (-kv[1], kv[0]))
    pieces += [(p, s, "normal") for p, s in ranked if p not in taken]
    return UnigramTokenizer(pieces, byte_fallback=byte_fallback, normalization="nfkc", roles=roles)


def _prune(
    alive: np.ndarray,
    logp: np.ndarray,
    is_char: np.ndarray,
    edges: _EdgeSet,
    inner: _Lattice,
    whole: np.ndarray,
    weights: np.ndarray,
    desired: int,
    shrinking_factor: float,
) -> np.ndarray:
    """One pruning round (module docstring, step 4): the new ``alive`` mask."""
    n = len(alive)
    # how each piece is segmented by the others: its best path without itself
    sub = inner.select(alive[inner.piece] & alive[inner.word] & ~whole)
    alt_score, alt_steps = sub.viterbi(logp)
    # Viterbi counts over the training words
    _, steps = edges.viterbi(logp)
    freq = np.zeros(n)
    for taken in steps:
        ok = taken >= 0
        np.add.at(freq, taken[ok], weights[ok])
    total = freq.sum()
    log_total = math.log(total)
    # alternatives as lists per piece
    alt_len = np.zeros(n, dtype=np.int64)
    for taken in alt_steps:
        alt_len += taken >= 0
    log_alt_sum = np.log(total + freq * np.maximum(alt_len - 1, 0))
    logprob_alt = np.zeros(n)
    for taken in alt_steps:  # a zero count here belongs to a piece that is dropped anyway
        ok = taken >= 0
        idx = np.flatnonzero(ok)
        with np.errstate(divide="ignore"):
            logprob_alt[idx] += np.log(freq[taken[ok]] + freq[idx]) - log_alt_sum[idx]
    with np.errstate(divide="ignore"):
        logprob_sp = np.log(freq) - log_total
    split_better = np.isfinite(alt_score) & (alt_score > logp)
    no_alternative = ~np.isfinite(alt_score)
    keep = np.zeros(n, dtype=bool)
    keep |= alive & is_char
    keep |= alive & no_alternative & (freq > 0)
    candidates = np.flatnonzero(alive & ~keep & (freq > 0) & ~split_better)
    loss = (freq[candidates] / weights.sum()) * (logprob_sp[candidates] - logprob_alt[candidates])
    size = max(desired, int(shrinking_factor * alive.sum()))
    room = max(0, size - int(keep.sum()))
    chosen = candidates[np.argsort(-loss, kind="stable")[:room]]
    keep[chosen] = True
    return keep


__all__ = ["ALBERT_SPECIAL_PIECES", "DEFAULT_SPECIAL_PIECES", "digamma", "train_unigram"]
