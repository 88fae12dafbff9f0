"""TF-IDF document vectors (Sparck Jones 1972; Salton & Buckley 1988), as a sparse matrix.

A document becomes the counts of its terms, weighted by how rare each term is across the
collection::

    tf(t, d)  = count of t in d            or, sublinear,  1 + ln count   (for count > 0)
    idf(t)    = ln(N / df(t)) + 1          or, smoothed,   ln((1 + N) / (1 + df(t))) + 1
    x(d)      = tf(., d) * idf(.),  then divided by its l2 (or l1) norm

with ``N`` documents and ``df(t)`` the number of documents holding ``t``. Terms are the word
n-grams (``ngram_range``) of the lowercased text, words found by scikit-learn's default pattern
``(?u)\\b\\w\\w+\\b`` (two or more word characters); terms in fewer than ``min_df`` or more than
``max_df`` documents (a count, or a fraction when a float) are dropped. The choices and the column
order (terms sorted) are scikit-learn's ``TfidfVectorizer``'s, so the two give the same matrix.

Counting is vectorised: words become int ids, an n-gram's key is ``id(first n-1 words) * |V| +
last word`` (as in :mod:`lmarch.classic.ngram`), and one ``np.unique`` per n gives the distinct
n-grams; only those distinct n-grams are turned back into strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import scipy.sparse as sp

from lmarch.errors import LmarchError

TOKEN_PATTERN = r"(?u)\b\w\w+\b"


@dataclass(frozen=True)
class TfidfConfig:
    """TfidfVectorizer's options that lmarch supports, with its defaults."""

    ngram_range: tuple[int, int] = (1, 1)
    min_df: float = 1
    max_df: float = 1.0
    sublinear_tf: bool = False
    smooth_idf: bool = True
    use_idf: bool = True
    norm: str | None = "l2"
    lowercase: bool = True
    token_pattern: str = TOKEN_PATTERN

    def __post_init__(self) -> None:
        lo, hi = self.ngram_range
        if not 1 <= lo <= hi:
            raise LmarchError(
                f"bad n-gram range {lo} {hi}", hint="two whole numbers 1 <= min <= max, e.g. 1 2"
            )
        if self.norm not in ("l2", "l1", None):
            raise LmarchError(f"unknown norm {self.norm!r}", hint="l2, l1 or none")
        for name in ("min_df", "max_df"):
            value = getattr(self, name)
            if isinstance(value, Integral) and value < 0:
                raise LmarchError(f"{name} must be >= 0, got {value}")
            if not isinstance(value, Integral) and not 0.0 <= value <= 1.0:
                raise LmarchError(
                    f"{name} as a fraction must lie in [0, 1], got {value}",
                    hint="or give a whole number of documents",
                )


class Tfidf:
    """Fit the vocabulary and idf on documents, then turn documents into TF-IDF rows.

    After :meth:`fit`: ``terms`` (sorted; column ``j`` is ``terms[j]``), ``vocabulary``
    (term -> column) and ``idf``.
    """

    def __init__(self, config: TfidfConfig | None = None) -> None:
        self.config = config or TfidfConfig()
        self.terms: list[str] = []
        self.vocabulary: dict[str, int] = {}
        self.idf = np.zeros(0)
        self._pattern = re.compile(self.config.token_pattern)

    def _words(self, doc: str) -> list[str]:
        return self._pattern.findall(doc.lower() if self.config.lowercase else doc)

    def _counts(self, docs: Sequence[str]) -> tuple[sp.csr_matrix, list[str]]:
        """Term counts (documents x distinct terms, columns in no particular order) and the
        terms of the columns."""
        index: dict[str, int] = {}
        ids = [
            np.fromiter((index.setdefault(w, len(index)) for w in self._words(d)), dtype=np.int64)
            for d in docs
        ]
        words = np.array(list(index), dtype=object)
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        doc_of = np.repeat(np.arange(len(docs)), lengths)
        pos = np.arange(len(stream)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        size = max(len(index), 1)
        lo, hi = self.config.ngram_range
        rows, cols, terms = [], [], []
        prev = None
        for n in range(1, hi + 1):
            where = np.flatnonzero(pos >= n - 1)  # n-grams inside one document
            key = stream[where] if n == 1 else prev[where - 1] * size + stream[where]
            uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
            gid = np.full(len(stream), -1, dtype=np.int64)
            gid[where] = inv
            if n >= lo and len(uniq):
                ends = where[first]
                parts = [words[stream[ends - k]] for k in range(n - 1, -1, -1)]
                terms += [" ".join(t) for t in zip(*parts, strict=True)]
                rows.append(doc_of[where])
                cols.append(inv + len(terms) - len(uniq))
            prev = gid
        if not terms:
            raise LmarchError(
                "the documents hold no terms",
                hint="each document needs words of two or more letters",
            )
        data = np.ones(sum(len(r) for r in rows))
        counts = sp.csr_matrix(
            (data, (np.concatenate(rows), np.concatenate(cols))), shape=(len(docs), len(terms))
        )
        counts.sum_duplicates()
        return counts, terms

    def fit_transform(self, docs: Sequence[str]) -> sp.csr_matrix:
        """Learn the vocabulary and idf from ``docs`` and return their TF-IDF matrix."""
        docs = list(docs)
        if not docs:
            raise LmarchError("no documents to vectorise")
        counts, terms = self._counts(docs)
        df = np.bincount(counts.indices, minlength=counts.shape[1])
        n = len(docs)
        cfg = self.config
        high = cfg.max_df if isinstance(cfg.max_df, Integral) else cfg.max_df * n
        low = cfg.min_df if isinstance(cfg.min_df, Integral) else cfg.min_df * n
        if high < low:
            raise LmarchError("max_df corresponds to fewer documents than min_df")
        keep = np.flatnonzero((df <= high) & (df >= low))
        if len(keep) == 0:
            raise LmarchError(
                "after min_df/max_df no terms remain", hint="lower --min-df or raise --max-df"
            )
        order = sorted(keep.tolist(), key=terms.__getitem__)
        self.terms = [terms[j] for j in order]
        self.vocabulary = {t: j for j, t in enumerate(self.terms)}
        counts = counts[:, order].tocsr()
        df = df[order].astype(np.float64)
        smooth = int(cfg.smooth_idf)
        self.idf = np.log((n + smooth) / (df + smooth)) + 1.0
        return self._weigh(counts)

    def fit(self, docs: Sequence[str]) -> Tfidf:
        """Learn the vocabulary and idf from ``docs``."""
        self.fit_transform(docs)
        return self

    def transform(self, docs: Sequence[str]) -> sp.csr_matrix:
        """TF-IDF rows of ``docs`` over the fitted vocabulary (unknown terms are ignored)."""
        if not self.terms:
            raise LmarchError("fit the TF-IDF model before transforming")
        docs = list(docs)
        counts, terms = self._counts(docs)
        column = np.array([self.vocabulary.get(t, -1) for t in terms], dtype=np.int64)
        coo = counts.tocoo()
        known = column[coo.col] >= 0
        matrix = sp.csr_matrix(
            (coo.data[known], (coo.row[known], column[coo.col[known]])),
            shape=(len(docs), len(self.terms)),
        )
        return self._weigh(matrix)

    def _weigh(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        x = counts.astype(np.float64)
        x.sort_indices()
        if self.config.sublinear_tf:
            x.data = np.log(x.data) + 1.0
        if self.config.use_idf:
            x.data *= self.idf[x.indices]
        if self.config.norm is not None:
            values = np.abs(x.data) if self.config.norm == "l1" else x.data * x.data
            per_row = np.diff(x.indptr)
            row = np.repeat(np.arange(x.shape[0]), per_row)
            norms = np.bincount(row, weights=values, minlength=x.shape[0])
            if self.config.norm == "l2":
                norms = np.sqrt(norms)
            norms[norms == 0] = 1.0
            x.data /= np.repeat(norms, per_row)
        return x


def top_terms(matrix: sp.csr_matrix, terms: Sequence[str], row: int, k: int) -> list[tuple]:
    """The ``k`` heaviest terms of one row, as ``(term, weight)``, heaviest first (ties by term)."""
    start, end = matrix.indptr[row], matrix.indptr[row + 1]
    cols, vals = matrix.indices[start:end], matrix.data[start:end]
    best = sorted(
        zip(vals.tolist(), cols.tolist(), strict=True), key=lambda v: (-v[0], terms[v[1]])
    )
    return [(terms[c], v) for v, c in best[:k]]


def cosine_similarities(matrix: sp.csr_matrix) -> np.ndarray:
    """Cosine similarity of every pair of rows (a dense documents x documents array)."""
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    unit = sp.diags(1.0 / norms) @ matrix
    return np.asarray((unit @ unit.T).todense())
