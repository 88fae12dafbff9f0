"""An n-gram language model with Kneser-Ney, modified Kneser-Ney or add-k smoothing.

A model of order ``n`` predicts a token from the ``n - 1`` tokens before it. Each line of text is
a sentence, padded with ``n - 1`` start symbols ``<s>`` on the left and closed by ``</s>``, which
the model predicts like any token (for characters it stands for the newline). ``<s>`` itself is
never predicted; tokens unseen in training are scored as ``<UNK>``.

Interpolated Kneser-Ney (Kneser & Ney 1995; Chen & Goodman 1998, eq. 26), for a context ``h`` of
length ``m - 1`` and its suffix ``h'`` one token shorter::

    p_m(w | h) = max(a_m(h w) - D(a), 0) / a_m(h .)  +  gamma_m(h) p_{m-1}(w | h')
    gamma_m(h) = sum_w D(a_m(h w)) / a_m(h .)

where ``a_n`` is the raw count at the highest order and, below it, the continuation count
``a_m(g) = N1+(. g)``: the number of distinct tokens seen before ``g``. A context never seen
(``a_m(h .) = 0``) passes ``p_{m-1}`` through unchanged. The unigram level is interpolated with the
uniform distribution over the predictable vocabulary, so every token, ``<UNK>`` included, has a
probability above zero. Plain KN uses one discount per order, ``D = n1 / (n1 + 2 n2)`` (Ney et al.
1994) from that order's count-of-counts ``n_k``; modified KN (Chen & Goodman 1998, eq. 26-27) uses
three, for counts 1, 2 and 3+::

    Y = n1 / (n1 + 2 n2),  D1 = 1 - 2 Y n2/n1,  D2 = 2 - 3 Y n3/n2,  D3+ = 3 - 4 Y n4/n3

Add-k (Lidstone; Laplace at ``k = 1``) uses the highest order alone::

    p(w | h) = (c(h w) + k) / (c(h) + k |V|)

Counting is vectorised. Every m-gram gets a dense id at its order: the key of an m-gram is
``id(first m-1 tokens) * |V| + last token``, an int64 that cannot overflow, and one ``np.unique``
per order over all positions of the padded corpus gives the ids, the counts and (from the pairs of
an (m+1)-gram and its suffix) the continuation counts. Scoring a text looks the keys up with
``np.searchsorted``, order by order, for all positions at once.

``nltk_compat=True`` reproduces ``nltk.lm`` (3.10.4) formula for formula, for the oracle tests:
sentences padded with ``n - 1`` ``</s>`` as ``padded_everygram_pipeline`` does; a fixed discount
(nltk's default 0.1) at every order; the unigram level is the plain continuation ratio
``N1+(. w) / N1+(. .)``, with no discount and no uniform floor (so an unseen word scores 0 and a
text with one has infinite perplexity); ``gamma`` counts the distinct words after ``h`` in the
*raw* counts, while its numerators use continuation counts, so a lower-order distribution may sum
to slightly more or less than 1; ``<s>`` is part of the vocabulary that add-k divides by. Our
default differs in each of those points, and estimates its discounts from the data, because those
are what make every distribution sum to 1 and give finite perplexity on new text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmarch.classic.text import WORDS_AND_LINES, tokenize
from lmarch.errors import LmarchError

BOS, EOS, UNK = "<s>", "</s>", "<UNK>"
BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
SMOOTHINGS = ("kn", "mkn", "addk")
UNITS = ("word", "char")


@dataclass(frozen=True)
class NgramConfig:
    """The model's settings: order, smoothing (``kn``, ``mkn`` or ``addk``), the add-k ``k``, a
    fixed KN ``discount`` (``None``: estimated per order from the counts), the token ``unit`` of
    :meth:`NgramLM.fit_text` and ``nltk_compat`` (nltk.lm's formulas; see the module docstring)."""

    order: int = 3
    smoothing: str = "mkn"
    k: float = 1.0
    discount: float | None = None
    unit: str = "word"
    nltk_compat: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise LmarchError(
                f"the n-gram order must be a whole number >= 1, got {self.order}",
                hint="--order 3 predicts each token from the two before it",
            )
        if self.smoothing not in SMOOTHINGS:
            raise LmarchError(
                f"unknown smoothing {self.smoothing!r}", hint=f"one of {', '.join(SMOOTHINGS)}"
            )
        if self.unit not in UNITS:
            raise LmarchError(f"unknown unit {self.unit!r}", hint="word or char")
        if not (self.k > 0 and math.isfinite(self.k)):
            raise LmarchError(f"add-k needs k > 0, got {self.k}", hint="--k 1 is Laplace")
        if self.discount is not None and not 0 < self.discount <= 1:
            raise LmarchError(
                f"a fixed Kneser-Ney discount must lie in (0, 1], got {self.discount}",
                hint="leave it unset to estimate the discounts from the counts",
            )
        if self.nltk_compat and self.smoothing == "mkn":
            raise LmarchError("nltk.lm has no modified Kneser-Ney", hint="use kn or addk")
        if self.nltk_compat and self.order < 2:
            # nltk pads nothing at order 1 and its Kneser-Ney divides by zero there
            raise LmarchError("the nltk-compatible mode needs order >= 2")


@dataclass(frozen=True)
class NgramScore:
    """How well a model predicts a text: ``tokens`` predictions (tokens and line ends), the
    ``characters`` they cover, total ``nats``, and the usual ratios of those."""

    tokens: int
    characters: int
    nats: float
    unknown: int

    @property
    def nats_per_token(self) -> float:
        """Cross-entropy in nats per predicted token."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(cross-entropy per token)."""
        return math.exp(self.nats_per_token) if math.isfinite(self.nats) else math.inf

    @property
    def bits_per_char(self) -> float:
        """Total bits over the characters of the text (the line ends included)."""
        return self.nats / math.log(2) / max(self.characters, 1)

    def as_dict(self) -> dict[str, float | int]:
        """The figures as a JSON-ready dict."""
        return {
            "tokens": self.tokens,
            "characters": self.characters,
            "unknown": self.unknown,
            "nats_per_token": self.nats_per_token,
            "perplexity": self.perplexity,
            "bits_per_char": self.bits_per_char,
        }


def kn_discount(n1: int, n2: int) -> float:
    """Ney et al.'s single Kneser-Ney discount ``D = n1 / (n1 + 2 n2)``."""
    return n1 / (n1 + 2 * n2)


def modified_kn_discounts(n1: int, n2: int, n3: int, n4: int) -> tuple[float, float, float]:
    """Chen & Goodman's (1998, eq. 26) discounts ``(D1, D2, D3+)`` from the count-of-counts."""
    y = n1 / (n1 + 2 * n2)
    return 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3


def _safe_discounts(counts: np.ndarray, smoothing: str) -> tuple[float, ...]:
    """The estimated discounts of one order, where the formulas are defined and in range; else
    a plain-KN (or 0.5) stand-in, so that a tiny corpus still gives every token some mass."""
    n = [int(np.count_nonzero(counts == k)) for k in (1, 2, 3, 4)]
    y = kn_discount(n[0], n[1]) if n[0] and n[1] else 0.5
    fallback = y if 0 < y < 1 else 0.5
    if smoothing == "kn":
        return (fallback,)
    out = []
    for k in (1, 2, 3):
        d = k - (k + 1) * y * n[k] / n[k - 1] if n[k - 1] else math.nan
        out.append(d if 0 < d <= k else fallback)
    return tuple(out)


def detokenize(tokens: Sequence[str], unit: str) -> str:
    """Tokens (``</s>`` as a line end) back to text; words are joined by spaces, except before
    punctuation."""
    lines: list[list[str]] = [[]]
    for token in tokens:
        if token == EOS:
            lines.append([])
        else:
            lines[-1].append(token)
    if unit == "char":
        return "\n".join("".join(line) for line in lines)
    joined = (" ".join(line) for line in lines)
    return "\n".join(re.sub(r" ([,.;:!?])", r"\1", line) for line in joined)


def _pad(tokens: np.ndarray, lengths: np.ndarray, left: int, right: int):
    """The padded stream ``<s>*left + sentence + </s>*right`` of every sentence, each
    position's index inside its padded sentence, and the mask of positions that are predicted
    (the tokens and each sentence's first ``</s>``)."""
    lengths = lengths.astype(np.int64)
    padded = lengths + left + right
    starts = np.cumsum(padded) - padded
    stream = np.full(int(padded.sum()), BOS_ID, dtype=np.int64)
    token_starts = np.cumsum(lengths) - lengths
    within = np.arange(len(tokens)) - np.repeat(token_starts, lengths)
    stream[np.repeat(starts + left, lengths) + within] = tokens
    for j in range(right):
        stream[starts + left + lengths + j] = EOS_ID
    pos = np.arange(len(stream)) - np.repeat(starts, padded)
    target = (pos >= left) & (pos <= left + np.repeat(lengths, padded))
    return stream, pos, target


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and each value's index among them. Measured on 2 cores: for
    millions of int64, ``torch.unique`` is about twice as fast as ``np.unique`` with
    ``return_inverse`` (0.9 s against 1.8-2.6 s at 4.7M); below a million it is slower (0.4 s
    against 0.02 s at 130k), so the size picks the library."""
    if len(values) < _TORCH_UNIQUE_FROM:
        return np.unique(values, return_inverse=True)
    uniq, inv = torch.unique(torch.from_numpy(values), sorted=True, return_inverse=True)
    return uniq.numpy(), inv.numpy()


_TORCH_UNIQUE_FROM = 2_000_000


def _text_ids(text: str, unit: str, index: dict[str, int] | None):
    """``text`` as token ids and sentence lengths, the same as :func:`tokenize` then a lookup,
    but vectorised for characters. With ``index=None`` the vocabulary is built from the text
    (returned as a list, ids 0-2 reserved); otherwise unknown tokens become ``<UNK>``."""
    if unit == "char":
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        newline = points == ord("\n")
        breaks = np.flatnonzero(newline)
        lengths = np.diff(np.concatenate([[-1], breaks, [len(points)]])) - 1
        points = points[~newline]
        if index is None:
            known = np.unique(points)
            vocab = [BOS, EOS, UNK, *map(chr, known.tolist())]
        else:
            vocab = None
            known = np.array(sorted(ord(t) for t in index if len(t) == 1), dtype=np.int64)
        found = _find(known, points)
        if index is None:
            return found + 3, lengths, vocab
        ids = np.array([index[chr(c)] for c in known.tolist()], dtype=np.int64)
        return np.where(found >= 0, ids[np.maximum(found, 0)], UNK_ID), lengths, None
    words = WORDS_AND_LINES.findall(text)
    if index is None:
        vocab = [BOS, EOS, UNK, *sorted(set(words) - {"\n", BOS, EOS, UNK})]
        index = {token: i for i, token in enumerate(vocab)}
    else:
        vocab = None
    index = {**index, "\n": -1}
    get = index.get
    ids = np.fromiter((get(w, UNK_ID) for w in words), dtype=np.int64, count=len(words))
    newline = ids == -1
    breaks = np.flatnonzero(newline)
    lengths = np.diff(np.concatenate([[-1], breaks, [len(ids)]])) - 1
    return ids[~newline], lengths, vocab


def _find(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of each query in the sorted ``keys``, or -1 where absent."""
    idx = np.searchsorted(keys, query)
    idx[idx == len(keys)] = 0
    hit = (keys[idx] == query) if len(keys) else np.zeros(len(query), dtype=bool)
    return np.where(hit, idx, -1)


class NgramLM:
    """A smoothed n-gram language model (see the module docstring for the equations).

    Train with :meth:`fit` (sentences of string tokens) or :meth:`fit_text`; score with
    :meth:`prob`, :meth:`distribution`, :meth:`log_probs` and :meth:`evaluate_text`; draw text
    with :meth:`sample`. ``vocab[i]`` is the token of id ``i``; ids 0-2 are ``<s>``, ``</s>``,
    ``<UNK>``.
    """

    def __init__(self, config: NgramConfig, vocab: list[str], keys: list, counts: list) -> None:
        self.config = config
        self.vocab = list(vocab)
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.keys = [np.asarray(k, dtype=np.int64) for k in keys]  # per order, sorted
        self.counts = [np.asarray(c, dtype=np.int64) for c in counts]  # a_m of each key
        self.discounts = self._discounts()
        self._tables = [self._table(m) for m in range(1, config.order + 1)]

    # --- training ----------------------------------------------------------------------------

    @classmethod
    def fit(cls, sentences: Sequence[Sequence[str]], config: NgramConfig) -> NgramLM:
        """Count the n-grams of ``sentences`` (lists of tokens) and build the model."""
        vocab = [BOS, EOS, UNK, *sorted({t for s in sentences for t in s} - {BOS, EOS, UNK})]
        index = {token: i for i, token in enumerate(vocab)}
        tokens = np.fromiter((index[t] for s in sentences for t in s), dtype=np.int64)
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        return cls._fit_ids(tokens, lengths, vocab, config)

    @classmethod
    def fit_text(cls, text: str, config: NgramConfig) -> NgramLM:
        """Train on ``text``, one sentence per line, split into ``config.unit`` tokens."""
        tokens, lengths, vocab = _text_ids(text, config.unit, None)
        return cls._fit_ids(tokens, lengths, vocab, config)

    @classmethod
    def _fit_ids(cls, tokens, lengths, vocab: list[str], config: NgramConfig) -> NgramLM:
        if len(tokens) == 0:
            raise LmarchError(
                "the training text holds no tokens", hint="give a corpus with some text in it"
            )
        n, size = config.order, len(vocab)
        right = n - 1 if config.nltk_compat else 1
        stream, pos, _ = _pad(tokens, lengths, n - 1, right)
        keys, raw, suffix = [], [], []
        prev = None
        for m in range(1, n + 1):
            where = np.flatnonzero(pos >= m - 1)  # m-grams inside one padded sentence
            key = stream[where] if m == 1 else prev[where - 1] * size + stream[where]
            uniq, inv = _unique(key)
            gid = np.full(len(stream), -1, dtype=np.int64)
            gid[where] = inv
            if m > 1:  # each m-gram's suffix (m-1)-gram, for the continuation counts
                link = np.empty(len(uniq), dtype=np.int64)
                link[inv] = prev[where]
                suffix.append(link)
            keys.append(uniq)
            raw.append(np.bincount(inv, minlength=len(uniq)))
            prev = gid
        counts = []
        for m in range(1, n + 1):
            ends_bos = keys[m - 1] % size == BOS_ID
            if config.smoothing == "addk" or m == n:
                c = raw[m - 1].copy()
                if not config.nltk_compat:
                    c[ends_bos] = 0
            else:  # N1+(. g): distinct (m+1)-grams whose suffix is g
                above = suffix[m - 1]
                if not config.nltk_compat:
                    above = above[keys[m] % size != BOS_ID]
                c = np.bincount(above, minlength=len(keys[m - 1]))
            counts.append(c)
        return cls(config, vocab, keys, counts)

    # --- the smoothed tables -----------------------------------------------------------------

    def _discounts(self) -> list[tuple[float, ...]]:
        cfg = self.config
        if cfg.smoothing == "addk":
            return [() for _ in self.counts]
        if cfg.discount is not None or cfg.nltk_compat:
            d = 0.1 if cfg.discount is None else cfg.discount
            return [(d,) if cfg.smoothing == "kn" else (d, d, d) for _ in self.counts]
        return [_safe_discounts(c, cfg.smoothing) for c in self.counts]

    @property
    def num_parameters(self) -> int:
        """The n-gram counts stored (all orders): what the model learns, as a parameter count."""
        return int(sum(len(k) for k in self.keys))

    @property
    def predictable(self) -> int:
        """|V| of the smoothing: the vocabulary less ``<s>`` (with it, in nltk mode)."""
        return len(self.vocab) - (0 if self.config.nltk_compat else 1)

    def _table(self, m: int) -> dict[str, np.ndarray]:
        """Per m-gram the discounted numerator ``num``; per context ``h`` the total ``a(h .)``
        and the back-off mass ``gamma`` (numerators, not yet divided by the total)."""
        cfg, size = self.config, len(self.vocab)
        keys, a = self.keys[m - 1], self.counts[m - 1].astype(np.float64)
        prefix = keys // size if m > 1 else np.zeros(len(keys), dtype=np.int64)
        contexts = len(self.keys[m - 2]) if m > 1 else 1
        total = np.bincount(prefix, weights=a, minlength=contexts)
        if cfg.smoothing == "addk":
            return {"num": a, "total": total, "gamma": np.zeros(contexts)}
        d = self.discounts[m - 1]
        if len(d) == 3:
            per = np.where(a >= 3, d[2], np.where(a == 2, d[1], d[0]))
        else:
            per = np.full(len(a), d[0])
        if cfg.nltk_compat:
            if m == 1:  # nltk: the plain continuation ratio, no discount
                return {"num": a, "total": total, "gamma": np.zeros(1)}
            gamma = d[0] * np.bincount(prefix, minlength=contexts).astype(np.float64)
        else:
            per = np.where(a > 0, per, 0.0)
            gamma = np.bincount(prefix, weights=per, minlength=contexts)
        return {"num": np.maximum(a - per, 0.0), "total": total, "gamma": gamma}

    def _floor(self) -> float:
        """The distribution below the unigram level: uniform over the predictable tokens."""
        return 0.0 if self.config.nltk_compat else 1.0 / self.predictable

    # --- scoring -----------------------------------------------------------------------------

    def encode(self, sentences: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (unknown tokens as ``<UNK>``) of all sentences, and their lengths."""
        get = self.index.get
        tokens = np.fromiter((get(t, UNK_ID) for s in sentences for t in s), dtype=np.int64)
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        return tokens, lengths

    def _gram_ids(self, stream: np.ndarray, pos: np.ndarray, top: int) -> list[np.ndarray]:
        """For orders 1..top, the id of the m-gram ending at each position (-1: unseen)."""
        size, out, prev = len(self.vocab), [], None
        for m in range(1, top + 1):
            if m == 1:
                out.append(_find(self.keys[0], stream))
            else:
                gid = np.full(len(stream), -1, dtype=np.int64)
                where = np.flatnonzero(pos >= m - 1)
                where = where[prev[where - 1] >= 0]
                gid[where] = _find(self.keys[m - 1], prev[where - 1] * size + stream[where])
                out.append(gid)
            prev = out[-1]
        return out

    def _probs_at(self, ids: list[np.ndarray], targets: np.ndarray, top: int) -> np.ndarray:
        """p(token at t | up to top-1 tokens before it) for every position t in ``targets``."""
        if self.config.smoothing == "addk":
            t = self._tables[top - 1]
            h = ids[top - 2][targets - 1] if top > 1 else np.zeros(len(targets), dtype=np.int64)
            g = ids[top - 1][targets]
            count = np.where(g >= 0, t["num"][g], 0.0)
            total = np.where(h >= 0, t["total"][h], 0.0)
            return (count + self.config.k) / (total + self.config.k * self.predictable)
        p = np.full(len(targets), self._floor())
        for m in range(1, top + 1):
            t = self._tables[m - 1]
            h = ids[m - 2][targets - 1] if m > 1 else np.zeros(len(targets), dtype=np.int64)
            g = ids[m - 1][targets]
            total = np.where(h >= 0, t["total"][np.maximum(h, 0)], 0.0)
            seen = total > 0
            num = np.where(g >= 0, t["num"][np.maximum(g, 0)], 0.0)
            gamma = t["gamma"][np.maximum(h, 0)]
            p = np.where(seen, (num + gamma * p) / np.where(seen, total, 1.0), p)
        return p

    def _last(self, context: Sequence[str]) -> list[str]:
        """The part of ``context`` the model looks at: its last ``order - 1`` tokens."""
        keep = self.config.order - 1
        return list(context)[-keep:] if keep else []

    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        """p(word | context), from the last ``order - 1`` tokens of ``context`` (no padding is
        added: pass ``<s>`` tokens for a sentence start)."""
        context = self._last(context)
        stream = np.array([self.index.get(t, UNK_ID) for t in [*context, word]], dtype=np.int64)
        top = len(context) + 1
        ids = self._gram_ids(stream, np.arange(len(stream)), top)
        return float(self._probs_at(ids, np.array([len(stream) - 1]), top)[0])

    def distribution(self, context: Sequence[str] = ()) -> np.ndarray:
        """p(w | context) for every id ``w`` of :attr:`vocab` (``<s>`` gets 0 unless in nltk
        mode), computed for the whole vocabulary at once."""
        context = self._last(context)
        stream = np.array([self.index.get(t, UNK_ID) for t in context], dtype=np.int64)
        top = len(context) + 1
        ids = self._gram_ids(stream, np.arange(len(stream)), top - 1)
        size = len(self.vocab)
        if self.config.smoothing == "addk":
            p = self._addk_distribution(ids, top)
        else:
            p = np.full(size, self._floor())
            for m in range(1, top + 1):
                t = self._tables[m - 1]
                h = int(ids[m - 2][-1]) if m > 1 else 0
                if h < 0 or t["total"][h] == 0:
                    continue
                lo, hi = self._slice(m, h)
                total = t["total"][h]
                p *= t["gamma"][h] / total
                p[self.keys[m - 1][lo:hi] % size] += t["num"][lo:hi] / total
        if not self.config.nltk_compat:
            p[BOS_ID] = 0.0
        return p

    def _slice(self, m: int, h: int) -> tuple[int, int]:
        """The range of the order-m table whose m-grams start with context id ``h``."""
        if m == 1:
            return 0, len(self.keys[0])
        size = len(self.vocab)
        lo, hi = np.searchsorted(self.keys[m - 1], [h * size, (h + 1) * size])
        return int(lo), int(hi)

    def _addk_distribution(self, ids: list[np.ndarray], top: int) -> np.ndarray:
        t = self._tables[top - 1]
        h = int(ids[top - 2][-1]) if top > 1 else 0
        total = t["total"][h] if h >= 0 else 0.0
        denom = total + self.config.k * self.predictable
        p = np.full(len(self.vocab), self.config.k / denom)
        if h >= 0:
            lo, hi = self._slice(top, h)
            p[self.keys[top - 1][lo:hi] % len(self.vocab)] += t["num"][lo:hi] / denom
        return p

    def log_probs(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """ln p of every predicted token of ``sentences`` (each token, then ``</s>``), in order,
        each sentence padded with ``<s>`` as in training."""
        return self._log_probs_ids(*self.encode(sentences))

    def _log_probs_ids(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        n = self.config.order
        stream, pos, target = _pad(tokens, lengths, n - 1, 1)
        ids = self._gram_ids(stream, pos, n)
        with np.errstate(divide="ignore"):
            return np.log(self._probs_at(ids, np.flatnonzero(target), n))

    def evaluate_text(self, text: str) -> NgramScore:
        """Cross-entropy of ``text`` (tokenised by ``config.unit``): per token, and in bits per
        character of the text (each line end counted as a character)."""
        tokens, lengths, _ = _text_ids(text, self.config.unit, self.index)
        if len(tokens) == 0:
            raise LmarchError("the text to score holds no tokens")
        logp = self._log_probs_ids(tokens, lengths)
        return NgramScore(
            tokens=len(logp),
            characters=len(text) + 1,
            nats=float(-logp.sum()),
            unknown=int(np.count_nonzero(tokens == UNK_ID)),
        )

    # --- sampling ----------------------------------------------------------------------------

    def sample(self, num_tokens: int, seed: int = 0, prompt: str = "") -> str:
        """Draw ``num_tokens`` tokens after ``prompt`` (ancestral sampling, seeded; ``<UNK>``
        is never drawn); returns the generated text only (line ends for ``</s>``)."""
        if num_tokens < 0:
            raise LmarchError(f"cannot sample {num_tokens} tokens", hint="give a number >= 0")
        rng = np.random.default_rng(seed)
        n = self.config.order
        last_line = tokenize(prompt, self.config.unit)[-1] if prompt else []
        context = [BOS] * (n - 1) + last_line
        out = []
        for _ in range(num_tokens):
            p = self.distribution(context)
            p[UNK_ID] = 0.0
            p[BOS_ID] = 0.0
            choice = int(rng.choice(len(p), p=p / p.sum()))
            token = self.vocab[choice]
            out.append(token)
            context = [BOS] * (n - 1) if choice == EOS_ID else [*context, token]
            context = self._last(context)
        text = detokenize(out, self.config.unit)
        if self.config.unit == "word" and prompt and not prompt[-1].isspace():
            # words after the prompt's last word are separated from it as from each other
            text = text if not text or text[0] in ",.;:!?\n" else " " + text
        return text

    # --- state -------------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything needed to rebuild the model: a JSON-ready dict and named int64 arrays."""
        meta = {"config": asdict(self.config), "vocab": self.vocab}
        arrays = {}
        for m, (k, c) in enumerate(zip(self.keys, self.counts, strict=True), start=1):
            arrays[f"keys.{m}"], arrays[f"counts.{m}"] = k, c
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> NgramLM:
        """The model :meth:`state` described; a malformed state raises :class:`LmarchError`."""
        try:
            config = NgramConfig(**meta["config"])
            vocab = [str(t) for t in meta["vocab"]]
            order = config.order
            keys = [np.asarray(arrays[f"keys.{m}"], dtype=np.int64) for m in range(1, order + 1)]
            counts = [np.asarray(arrays[f"counts.{m}"]) for m in range(1, order + 1)]
        except (KeyError, TypeError) as exc:
            raise LmarchError(f"not an n-gram model state (missing {exc})") from exc
        for m, (k, c) in enumerate(zip(keys, counts, strict=True), start=1):
            below = len(keys[m - 2]) if m > 1 else 1
            if (
                k.ndim != 1
                or k.shape != c.shape
                or (len(k) and (np.any(np.diff(k) <= 0) or k[0] < 0 or k[-1] >= below * len(vocab)))
            ):
                raise LmarchError(f"n-gram model state: the order-{m} table is malformed")
        return cls(config, vocab, keys, counts)
