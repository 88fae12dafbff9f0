"""WordVectors against gensim's KeyedVectors holding the same vectors: neighbours, analogies and
both evaluations (counts exact, correlations to 1e-6) on gensim's own benchmark files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmarch.classic.vectors import WordVectors, gensim_test_file
from lmarch.errors import LmarchError

gensim_models = pytest.importorskip("gensim.models")


def _benchmark_vocabulary() -> list[str]:
    """Words of the three benchmark files as written and lower-cased (two case variants of one
    word, so the case-folding rules are exercised), a tenth of them dropped (out of vocabulary)."""
    words: list[str] = []
    seen: set[str] = set()

    def add(word: str) -> None:
        if word not in seen:
            seen.add(word)
            words.append(word)

    for line in gensim_test_file("questions-words.txt").read_text().splitlines():
        if not line.startswith(":"):
            for word in line.split():
                add(word.lower())
                add(word)
    for name in ("wordsim353.tsv", "simlex999.txt"):
        for line in gensim_test_file(name).read_text().splitlines():
            if not line.startswith("#"):
                for word in line.split("\t")[:2]:
                    add(word)
    rng = np.random.default_rng(0)
    return [w for w in words if rng.random() < 0.9]


@pytest.fixture(scope="module")
def pair() -> tuple[WordVectors, object]:
    """The same random vectors in lmarch and gensim; case variants of a word lie close together
    (so they crowd each other's neighbour lists), and the dimension is low so that some
    analogies come out right by chance."""
    words = _benchmark_vocabulary()
    rng = np.random.default_rng(1)
    base: dict[str, np.ndarray] = {}
    rows = []
    for word in words:
        key = word.lower()
        if key not in base:
            base[key] = rng.standard_normal(6)
        rows.append(base[key] + 0.05 * rng.standard_normal(6))
    vectors = np.asarray(rows, dtype=np.float32)
    keyed = gensim_models.KeyedVectors(vectors.shape[1])
    keyed.add_vectors(words, vectors)
    return WordVectors(words, torch.from_numpy(vectors)), keyed


@pytest.mark.parametrize("restrict_vocab", [1000, 30000])
def test_analogy_accuracy_equals_gensim(pair, restrict_vocab: int) -> None:
    ours, keyed = pair
    path = gensim_test_file("questions-words.txt")
    score, sections = keyed.evaluate_word_analogies(str(path), restrict_vocab=restrict_vocab)
    result = ours.evaluate_analogies(path, restrict_vocab=restrict_vocab)
    assert [s["section"] for s in result["sections"]] == [s["section"] for s in sections[:-1]]
    for mine, theirs in zip(result["sections"], sections[:-1]):
        assert mine["correct"] == len(theirs["correct"]), mine["section"]
        assert mine["total"] == len(theirs["correct"]) + len(theirs["incorrect"]), mine["section"]
    total = sections[-1]
    assert result["correct"] == len(total["correct"]) > 0
    assert result["total"] == len(total["correct"]) + len(total["incorrect"])
    assert result["accuracy"] == pytest.approx(score, abs=1e-12)
    assert result["questions"] == 19544  # the file's question lines
    assert result["oov"] == result["questions"] - result["total"] > 0


@pytest.mark.parametrize("name", ["wordsim353.tsv", "simlex999.txt"])
def test_word_pair_correlations_equal_gensim(pair, name: str) -> None:
    ours, keyed = pair
    path = gensim_test_file(name)
    pearson, spearman, oov_ratio = keyed.evaluate_word_pairs(str(path))
    result = ours.evaluate_word_pairs(path)
    assert result["spearman"] == pytest.approx(spearman.statistic, abs=1e-6)
    assert result["pearson"] == pytest.approx(pearson.statistic, abs=1e-6)
    assert result["oov_ratio"] == pytest.approx(oov_ratio, abs=1e-12)
    assert result["oov"] > 0


def test_neighbors_and_analogy_equal_gensim_most_similar(pair) -> None:
    ours, keyed = pair
    words = [w for w in ("king", "Paris", "paris", "Athens", "walking") if w in ours]
    assert len(words) >= 3 and all(w in ours for w in ("man", "king", "woman", "queen"))
    for word in words:
        mine = ours.neighbors(word, k=8)
        theirs = keyed.most_similar(word, topn=8)
        assert [w for w, _ in mine] == [w for w, _ in theirs]
        np.testing.assert_allclose([s for _, s in mine], [s for _, s in theirs], atol=1e-6)
    mine = ours.analogy("man", "king", "woman", k=5)
    theirs = keyed.most_similar(positive=["king", "woman"], negative=["man"], topn=5)
    assert [w for w, _ in mine] == [w for w, _ in theirs]
    np.testing.assert_allclose([s for _, s in mine], [s for _, s in theirs], atol=1e-6)
    vector = ours["king"] + ours["queen"]
    mine = ours.neighbors(vector, k=4, exclude=["king"])
    theirs = [(w, s) for w, s in keyed.similar_by_vector(vector.numpy(), topn=5) if w != "king"]
    assert [w for w, _ in mine] == [w for w, _ in theirs[:4]]


def test_small_table_exact_values() -> None:
    vectors = WordVectors(
        ["a", "b", "c", "d"],
        torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]]),
    )
    assert vectors.vector_size == 2 and len(vectors) == 4 and "c" in vectors and "z" not in vectors
    assert vectors.neighbors("a", k=3) == [
        ("c", pytest.approx(2**-0.5)),
        ("b", 0.0),
        ("d", -1.0),
    ]
    assert vectors.similarity("b", "c") == pytest.approx(2**-0.5)
    # on unit vectors b - a + c = (r - 1, 1 + r), r = 1/sqrt(2): only d is left, at cos
    # (1 - r) / |(r - 1, 1 + r)| = (1 - r) / sqrt(3)
    r = 2**-0.5
    assert vectors.analogy("a", "b", "c") == [("d", pytest.approx((1 - r) / 3**0.5))]
    torch.testing.assert_close(vectors["c"], torch.tensor([3.0, 3.0]))


def test_refusals_name_the_problem(tmp_path) -> None:
    vectors = WordVectors(["a", "b"], torch.eye(2))
    with pytest.raises(LmarchError, match="'zebra' is not in the vocabulary"):
        vectors.neighbors("zebra")
    with pytest.raises(LmarchError, match="'zebra' is not in the vocabulary"):
        vectors.analogy("a", "zebra", "b")
    with pytest.raises(LmarchError, match="'zebra' is not in the vocabulary"):
        vectors["zebra"]
    with pytest.raises(LmarchError, match="3 words but 2 vectors"):
        WordVectors(["a", "b", "c"], torch.eye(2))
    with pytest.raises(LmarchError, match="'a' appears twice"):
        WordVectors(["a", "a"], torch.eye(2))
    with pytest.raises(LmarchError, match="no evaluation file"):
        vectors.evaluate_word_pairs(tmp_path / "missing.tsv")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("x\ty\t1.0\n")
    with pytest.raises(LmarchError, match="no word pair with both words in the vocabulary"):
        vectors.evaluate_word_pairs(pairs)
    questions = tmp_path / "questions.txt"
    questions.write_text("a b a b\n")
    with pytest.raises(LmarchError, match="before any ': section' line"):
        vectors.evaluate_analogies(questions)
    with pytest.raises(LmarchError, match="gensim's test data has no file no-such-file.txt"):
        gensim_test_file("no-such-file.txt")


def test_missing_gensim_is_refused_with_the_install_line(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        LmarchError, match=r"gensim, which is not installed.*--no-deps gensim==4.4.0"
    ):
        gensim_test_file("questions-words.txt")
