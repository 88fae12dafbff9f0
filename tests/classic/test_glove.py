"""GloVe: counts equal to a double loop, J and AdaGrad equal to hand computations, and a short run
on the bundled tinyshakespeare that lowers J and places royal names near 'king'."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lmarch.classic import glove
from lmarch.classic.glove import (
    GloVe,
    GloveConfig,
    build_vocab,
    cooccurrence,
    train_glove,
    weighting,
)
from lmarch.classic.text import lower_words
from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.errors import LmarchError

# small tensors: one thread is faster than two contending ones on these machines
pytestmark = pytest.mark.usefixtures("one_thread")


def small_corpus(shakespeare_text: str) -> tuple[list[str], list[np.ndarray]]:
    """Two documents of real text, words under 3 occurrences removed (as GloVe removes them)."""
    docs = [lower_words(shakespeare_text[:3000]), lower_words(shakespeare_text[3000:5000])]
    vocab, _ = build_vocab(docs, min_count=3)
    index = {w: i for i, w in enumerate(vocab)}
    return vocab, [np.array([index[w] for w in d if w in index]) for d in docs]


def naive_counts(ids: list[np.ndarray], window: int) -> dict[tuple[int, int], Fraction]:
    """cooccur.c's loop: each word against the ``window`` words before it, 1/distance both ways."""
    counts: dict[tuple[int, int], Fraction] = {}
    for doc in ids:
        for j in range(len(doc)):
            for k in range(max(0, j - window), j):
                for pair in ((doc[k], doc[j]), (doc[j], doc[k])):
                    key = (int(pair[0]), int(pair[1]))
                    counts[key] = counts.get(key, Fraction(0)) + Fraction(1, j - k)
    return counts


@pytest.mark.parametrize("window", [1, 5, 10])
def test_cooccurrence_equals_a_double_loop_exactly(shakespeare_text: str, window: int) -> None:
    vocab, ids = small_corpus(shakespeare_text)
    X = cooccurrence(ids, len(vocab), window)
    expected = naive_counts(ids, window)
    got = dict(zip(map(tuple, X.indices().t().tolist()), X.values().tolist(), strict=True))
    assert got.keys() == expected.keys()
    # the exact rational sum, correctly rounded: equal as floats, not merely close
    assert all(got[key] == float(value) for key, value in expected.items())
    assert X.dtype == torch.float64 and X.is_coalesced()


def test_cooccurrence_in_floats_when_integers_would_not_be_exact(
    shakespeare_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab, ids = small_corpus(shakespeare_text)
    monkeypatch.setattr(glove, "_exact_scale", lambda window, positions: None)
    X = cooccurrence(ids, len(vocab), 7)
    expected = naive_counts(ids, 7)
    got = dict(zip(map(tuple, X.indices().t().tolist()), X.values().tolist(), strict=True))
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[k], float(v), rel_tol=1e-14) for k, v in expected.items())


def test_cooccurrence_refuses_an_empty_corpus() -> None:
    with pytest.raises(LmarchError, match="no words to count"):
        cooccurrence([np.array([], dtype=np.int64)], 5, 3)


def test_weighting_is_the_papers_f() -> None:
    x = torch.tensor([1.0, 50.0, 99.0, 100.0, 250.0], dtype=torch.float64)
    f = weighting(x, 100.0, 0.75)
    expected = [(v / 100.0) ** 0.75 if v < 100 else 1.0 for v in x.tolist()]
    assert f.tolist() == expected


def float64_model(shakespeare_text: str, window: int = 5) -> tuple[GloVe, torch.Tensor]:
    vocab, ids = small_corpus(shakespeare_text)
    X = cooccurrence(ids, len(vocab), window)
    model = GloVe(vocab, GloveConfig(dim=8, x_max=10.0, seed=3), dtype=torch.float64)
    # away from the initial point, so every term of J matters
    g = torch.Generator().manual_seed(1)
    for p in model.parameters().values():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model, X


def test_loss_vectorised_equals_a_loop(shakespeare_text: str) -> None:
    model, X = float64_model(shakespeare_text)
    J = model.loss(model.entries(X), chunk=100)  # several chunks
    W, Wc, b, bc = (p.tolist() for p in model.parameters().values())
    naive = 0.0
    for (i, j), x in zip(X.indices().t().tolist(), X.values().tolist(), strict=True):
        dot = sum(W[i][t] * Wc[j][t] for t in range(len(W[i])))
        diff = dot + b[i] + bc[j] - math.log(x)
        f = (x / 10.0) ** 0.75 if x < 10.0 else 1.0
        naive += f * diff * diff
    assert J > 100 and abs(J - naive) < 1e-9


@pytest.mark.parametrize("ratio", [0, 1000], ids=["rows-touched", "whole-tables"])
def test_adagrad_step_equals_a_hand_computation(
    shakespeare_text: str, ratio: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GloVe, "whole_table_ratio", ratio)  # each of the two update paths
    model, X = float64_model(shakespeare_text)
    entries = model.entries(X)
    # a minibatch where words repeat, as rows and as columns, so gradients add
    batch = entries.take(torch.tensor([0, 1, 2, 5, 40, 41, 90]))
    assert len(set(batch.rows.tolist())) < len(batch)
    before = {n: p.clone() for n, p in model.parameters().items()}
    lr = model.config.lr

    grads = {n: torch.zeros_like(p) for n, p in before.items()}
    J = 0.0
    for i, j, log_x, f in zip(
        batch.rows.tolist(), batch.cols.tolist(), batch.log_x.tolist(), batch.f.tolist()
    ):
        diff = float(before["W"][i] @ before["W_context"][j])
        diff += float(before["b"][i] + before["b_context"][j]) - log_x
        J += f * diff * diff
        grads["W"][i] += f * diff * before["W_context"][j]
        grads["W_context"][j] += f * diff * before["W"][i]
        grads["b"][i] += f * diff
        grads["b_context"][j] += f * diff
    reported = model.step(batch)

    assert abs(reported - J) < 1e-10
    for name, p in model.parameters().items():
        G = 1.0 + grads[name] ** 2  # glove.c's accumulators start at 1
        expected = before[name] - lr * grads[name] / G.sqrt()
        assert torch.allclose(p, expected, rtol=0, atol=1e-14), name
        assert torch.allclose(model.G[name], G, rtol=0, atol=1e-14), name
    # rows outside the minibatch did not move
    untouched = sorted(set(range(len(model.vocab))) - set(batch.rows.tolist()))
    assert torch.equal(model.W[untouched], before["W"][untouched])


def test_vectors_are_w_plus_context_or_w_alone(shakespeare_text: str) -> None:
    model, _ = float64_model(shakespeare_text)
    summed = model.word_vectors("sum")
    assert torch.equal(summed.vectors, (model.W + model.W_context).float())
    assert torch.equal(model.word_vectors("word").vectors, model.W.float())
    assert summed.words == model.vocab


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="GloVe window must be at least 1"):
        GloveConfig(window=0)
    with pytest.raises(ValueError, match="GloVe vectors must be 'sum' or 'word'"):
        GloveConfig(vectors="context")


def test_train_refuses_text_without_enough_words() -> None:
    with pytest.raises(LmarchError, match="the corpus holds no words"):
        train_glove(["", "12 ... 34"])
    with pytest.raises(LmarchError, match="only 1 distinct words occur at least 5 times"):
        train_glove(["one two three one one one one"])
    with pytest.raises(LmarchError, match="no two words of the vocabulary occur within 10 words"):
        train_glove(["one", "two", "one", "two"], GloveConfig(min_count=2))


def test_training_on_tinyshakespeare_lowers_j_and_finds_royal_neighbours() -> None:
    # measured (seed 0, 10 epochs, ~13 s on 2 cores): J 96,359 -> 15,131 (-84%); king's nearest
    # are edward, richard, henry; queen's elizabeth, margaret; father's include son, brother,
    # wife and daughter (and seed 1 gives the same three checks)
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    seen = []
    result = train_glove(
        [text], GloveConfig(epochs=10, batch_size=8192), progress=lambda e, j: seen.append(e)
    )
    assert seen == list(range(11))  # epoch 0: the counts are made
    assert len(result.model.vocab) == 3322 and result.tokens == 188963
    assert result.loss_end < 0.2 * result.loss_start
    assert result.epoch_losses[-1] < 0.25 * result.epoch_losses[0]
    v = result.vectors
    king = [w for w, _ in v.neighbors("king", 3)]
    assert set(king) == {"edward", "richard", "henry"}
    assert [w for w, _ in v.neighbors("queen", 2)] == ["elizabeth", "margaret"]
    father = {w for w, _ in v.neighbors("father", 10)}
    assert {"son", "brother", "wife", "daughter"} <= father
    assert result.summary()["settings"]["window"] == 10
