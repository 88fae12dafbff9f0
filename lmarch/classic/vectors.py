"""Word vectors and their standard evaluations: nearest neighbours, analogies, word similarity.

:class:`WordVectors` holds a vocabulary and one float32 row per word, whichever model made them
(word2vec, GloVe, a file in the word2vec or GloVe format). Its two benchmarks follow gensim's
``KeyedVectors`` exactly, so that a score here and a score there mean the same thing:

- analogies (Mikolov et al. 2013, "Efficient Estimation of Word Representations in Vector Space"):
  "a is to b as c is to ?" answered by 3CosAdd, ``argmax_w cos(w, b - a + c)`` on unit vectors with
  a, b and c themselves excluded; accuracy per section of ``questions-words.txt``;
- word similarity (WordSim-353, SimLex-999): Spearman and Pearson correlation between the cosine
  of each pair and the human score.

Both fold case (upper case, as gensim does: a word's first, most frequent, case variant stands for
it), look only at the first ``restrict_vocab`` words, and skip, but count, questions or pairs with a
word outside them.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lmarch.errors import LmarchError

GENSIM_PIP = "pip install --no-deps gensim==4.4.0"

# how many candidates gensim's evaluate_word_analogies asks most_similar for; the prediction is
# the first of them that is not a case variant of an input word
_ANALOGY_TOPN = 5


def gensim_test_file(name: str) -> Path:
    """Path of a file in ``gensim/test/test_data/`` (``questions-words.txt``, ``wordsim353.tsv``,
    ``simlex999.txt``, ...), found without importing gensim; refused when gensim is absent."""
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise LmarchError(
            f"the evaluation file {name} ships inside gensim, which is not installed",
            hint=GENSIM_PIP,
        )
    for location in locations:
        path = Path(location) / "test" / "test_data" / name
        if path.is_file():
            return path
    raise LmarchError(f"gensim's test data has no file {name}", hint=GENSIM_PIP)


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1; an all-zero row stays zero (its cosine with anything is 0)."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors / torch.where(norms > 0, norms, torch.ones_like(norms))


class WordVectors:
    """A vocabulary and its vectors: ``vectors[i]`` (float32, shape [V, d]) belongs to ``words[i]``.

    Words are expected in descending frequency (as word2vec, GloVe and their files order them):
    ``restrict_vocab`` in the evaluations keeps the first ones.
    """

    def __init__(self, words: Sequence[str], vectors: torch.Tensor) -> None:
        if vectors.dim() != 2:
            raise LmarchError(f"word vectors must be a 2-D table, got shape {tuple(vectors.shape)}")
        if len(words) != vectors.shape[0]:
            raise LmarchError(f"{len(words)} words but {vectors.shape[0]} vectors")
        self.words: list[str] = list(words)
        self.index: dict[str, int] = {}
        for i, word in enumerate(self.words):
            if word in self.index:
                raise LmarchError(f"the word {word!r} appears twice in the vocabulary")
            self.index[word] = i
        self.vectors: torch.Tensor = vectors.detach().to(torch.float32).contiguous()
        self._unit: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> torch.Tensor:
        return self.vectors[self.row(word)]

    def __repr__(self) -> str:
        return f"WordVectors({len(self)} words, {self.vector_size} dimensions)"

    @property
    def vector_size(self) -> int:
        """Number of dimensions d."""
        return self.vectors.shape[1]

    @property
    def unit_vectors(self) -> torch.Tensor:
        """Every row divided by its length (computed once)."""
        if self._unit is None:
            self._unit = _unit_rows(self.vectors)
        return self._unit

    def row(self, word: str) -> int:
        """Row of ``word``; a word outside the vocabulary is refused by name."""
        try:
            return self.index[word]
        except KeyError:
            raise LmarchError(
                f"the word {word!r} is not in the vocabulary ({len(self)} words)",
                hint="words are case-sensitive; training keeps words seen at least min-count times",
            ) from None

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity ``a·b / (|a| |b|)``."""
        unit = self.unit_vectors
        return float(unit[self.row(a)] @ unit[self.row(b)])

    def neighbors(
        self, word_or_vector: str | torch.Tensor, k: int = 10, exclude: Iterable[str] = ()
    ) -> list[tuple[str, float]]:
        """The ``k`` words of highest cosine similarity to a word (itself left out) or a vector,
        best first, leaving out the words in ``exclude``."""
        skip = {self.row(w) for w in exclude}
        if isinstance(word_or_vector, str):
            skip.add(self.row(word_or_vector))
            query = self.unit_vectors[self.row(word_or_vector)]
        else:
            query = word_or_vector.detach().to(torch.float32).reshape(-1)
            if query.shape[0] != self.vector_size:
                raise LmarchError(
                    f"a query vector of {query.shape[0]} dimensions for {self.vector_size}-d vectors"
                )
        return self._best(query, k, skip)

    def analogy(self, a: str, b: str, c: str, k: int = 1) -> list[tuple[str, float]]:
        """Answer "a is to b as c is to ?": the ``k`` words nearest ``b - a + c`` by 3CosAdd (the sum of
        the three unit vectors, Mikolov et al. 2013), the three inputs excluded — gensim's
        ``most_similar(positive=[b, c], negative=[a])``."""
        unit = self.unit_vectors
        rows = [self.row(a), self.row(b), self.row(c)]
        query = unit[rows[1]] - unit[rows[0]] + unit[rows[2]]
        return self._best(query, k, set(rows))

    def _best(self, query: torch.Tensor, k: int, skip: set[int]) -> list[tuple[str, float]]:
        if k < 1:
            return []
        norm = query.norm()
        scores = self.unit_vectors @ (query / norm if norm > 0 else query)
        top = torch.topk(scores, min(len(self), k + len(skip)))
        pairs = [
            (self.words[i], float(s))
            for s, i in zip(top.values.tolist(), top.indices.tolist())
            if i not in skip
        ]
        return pairs[:k]

    def _folded_vocab(self, restrict_vocab: int) -> dict[str, int]:
        """Upper-cased word -> row of its first (most frequent) case variant, first words only."""
        folded: dict[str, int] = {}
        for i, word in enumerate(self.words[:restrict_vocab]):
            folded.setdefault(word.upper(), i)
        return folded

    def evaluate_analogies(self, path: str | Path, restrict_vocab: int = 30000) -> dict:
        """Analogy accuracy on a ``questions-words.txt``-style file (``: section`` lines, then
        ``a b c expected`` lines), as gensim's ``evaluate_word_analogies``.

        Returns ``{"accuracy", "correct", "total", "oov", "questions", "oov_ratio", "sections":
        [{"section", "correct", "total", "accuracy"}, ...]}``: ``total`` counts answered questions,
        ``oov`` the skipped ones (a word outside the first ``restrict_vocab``), ``oov_ratio`` is in
        percent of all questions, and a section with nothing answered has accuracy 0.
        """
        path = Path(path)
        folded = self._folded_vocab(restrict_vocab)
        sections: list[dict] = []
        questions: list[tuple[int, list[int], list[str]]] = []  # (section, rows a b c, words)
        expected: list[str] = []
        oov = 0
        seen = 0
        for line_no, line in enumerate(_read_lines(path)):
            if line.startswith(": "):
                sections.append({"section": line.lstrip(": ").strip(), "correct": 0, "total": 0})
                continue
            if not sections:
                raise LmarchError(f"{path}: line {line_no + 1} comes before any ': section' line")
            parts = [w.upper() for w in line.split()]
            if len(parts) != 4:
                continue
            seen += 1
            if any(w not in folded for w in parts):
                oov += 1
                continue
            questions.append((len(sections) - 1, [folded[w] for w in parts[:3]], parts[:3]))
            expected.append(parts[3])
        answers = self._answer_analogies(questions, restrict_vocab)
        for (section, _, _), want, got in zip(questions, expected, answers):
            sections[section]["total"] += 1
            sections[section]["correct"] += int(got == want)
        for section in sections:
            section["accuracy"] = section["correct"] / section["total"] if section["total"] else 0.0
        correct = sum(s["correct"] for s in sections)
        total = sum(s["total"] for s in sections)
        return {
            "accuracy": correct / total if total else 0.0,
            "correct": correct,
            "total": total,
            "oov": oov,
            "questions": seen,
            "oov_ratio": 100.0 * oov / seen if seen else 0.0,
            "sections": sections,
        }

    def _answer_analogies(
        self, questions: list[tuple[int, list[int], list[str]]], restrict_vocab: int
    ) -> list[str | None]:
        """Upper-cased prediction per question, batched: the first of the best five candidates
        (inputs' rows removed) that is not a case variant of an input word, else the fifth."""
        unit = self.unit_vectors[:restrict_vocab]
        answers: list[str | None] = []
        for start in range(0, len(questions), 1024):
            chunk = questions[start : start + 1024]
            rows = torch.tensor([q[1] for q in chunk], dtype=torch.long)
            query = unit[rows[:, 1]] - unit[rows[:, 0]] + unit[rows[:, 2]]
            query = _unit_rows(query / 3)
            top = torch.topk(query @ unit.T, min(unit.shape[0], _ANALOGY_TOPN + 3), dim=1)
            for (_, q_rows, q_words), best in zip(chunk, top.indices.tolist()):
                candidates = [i for i in best if i not in q_rows][:_ANALOGY_TOPN]
                predicted = None
                for i in candidates:
                    predicted = self.words[i].upper()
                    if predicted not in q_words:
                        break
                answers.append(predicted)
        return answers

    def evaluate_word_pairs(self, path: str | Path, restrict_vocab: int = 300000) -> dict:
        """Correlation with human similarity scores on a tab-separated ``word1 word2 score`` file
        (``#`` lines are comments: ``wordsim353.tsv``, ``simlex999.txt``), as gensim's
        ``evaluate_word_pairs``.

        Returns ``{"spearman", "pearson", "pairs", "oov", "oov_ratio"}``: Spearman's rho is Pearson's
        r of the ranks (ties share their mean rank), ``pairs`` counts the pairs scored, ``oov`` the
        skipped ones, ``oov_ratio`` in percent of both.
        """
        path = Path(path)
        folded = self._folded_vocab(restrict_vocab)
        gold: list[float] = []
        pair_rows: list[tuple[int, int]] = []
        oov = 0
        for line in _read_lines(path):
            if line.startswith("#"):
                continue
            parts = [w.upper() for w in line.split("\t")]
            if len(parts) != 3:
                continue
            try:
                score = float(parts[2])
            except ValueError:
                continue
            if parts[0] not in folded or parts[1] not in folded:
                oov += 1
                continue
            gold.append(score)
            pair_rows.append((folded[parts[0]], folded[parts[1]]))
        if not gold:
            raise LmarchError(f"{path}: no word pair with both words in the vocabulary")
        unit = self.unit_vectors
        rows = torch.tensor(pair_rows, dtype=torch.long)
        model = (unit[rows[:, 0]] * unit[rows[:, 1]]).sum(dim=1).tolist()
        return {
            "spearman": _pearson(_ranks(gold), _ranks(model)),
            "pearson": _pearson(gold, model),
            "pairs": len(gold),
            "oov": oov,
            "oov_ratio": 100.0 * oov / (len(gold) + oov),
        }


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LmarchError(f"no evaluation file at {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise LmarchError(f"{path} is not UTF-8 text: {error}") from None


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, tied values sharing the mean of their ranks (as scipy's rankdata)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r = cov(x, y) / (sd(x) sd(y)), in float64; nan when either side is constant."""
    xs = torch.tensor(x, dtype=torch.float64)
    ys = torch.tensor(y, dtype=torch.float64)
    xs, ys = xs - xs.mean(), ys - ys.mean()
    denominator = float(xs.norm() * ys.norm())
    return float((xs * ys).sum()) / denominator if denominator > 0 else math.nan
