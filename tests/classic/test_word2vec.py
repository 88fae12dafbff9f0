"""word2vec: its pieces against gensim's (vocabulary, subsampling, negative table, windows), its
SGD step against autograd, and the trained vectors against gensim's Word2Vec on Shakespeare."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
import torch

from lmarch.classic.text import word_sentences
from lmarch.classic.vectors import WordVectors
from lmarch.classic.word2vec import (
    Vocabulary,
    Word2Vec,
    Word2VecConfig,
    context_windows,
    keep_probabilities,
    learning_rate,
    negative_table,
    train_word2vec,
)
from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.errors import LmarchError

gensim_models = pytest.importorskip("gensim.models")


@pytest.fixture(scope="module")
def small_sentences() -> list[list[str]]:
    return word_sentences(TINY_SHAKESPEARE.read_text(encoding="utf-8")[:200_000])


def test_word_sentences_lowercase_words_per_line() -> None:
    text = "KING RICHARD III:\nO'er the hills, my lord's 2 men!\n\n  --  \nGo."
    assert word_sentences(text) == [
        ["king", "richard", "iii"],
        ["o'er", "the", "hills", "my", "lord's", "men"],
        ["go"],
    ]


def test_vocabulary_subsampling_and_negative_table_equal_gensim(small_sentences) -> None:
    peer = gensim_models.Word2Vec(min_count=5, sample=1e-3, workers=1)
    peer.build_vocab(small_sentences)
    vocab = Vocabulary.build(small_sentences, min_count=5)
    counts = [int(peer.wv.get_vecattr(w, "count")) for w in peer.wv.index_to_key]
    assert sorted(zip(vocab.counts, vocab.words)) == sorted(zip(counts, peer.wv.index_to_key))
    assert vocab.counts == sorted(vocab.counts, reverse=True)
    # gensim keeps a word when its uint32 sample_int beats a random uint32
    keep = keep_probabilities(torch.tensor(vocab.counts), 1e-3)
    theirs = [peer.wv.get_vecattr(w, "sample_int") / (2**32 - 1) for w in vocab.words]
    np.testing.assert_allclose(keep.numpy(), theirs, atol=1e-9)
    assert keep[0] < 0.25 and keep[-1] == 1.0  # "the" mostly dropped, rare words all kept
    # gensim draws from a cumulative table of count^0.75; ours has 2^22 slots in those shares
    table = negative_table(torch.tensor(counts), 0.75)
    shares = torch.bincount(table.long(), minlength=len(counts)).double() / table.numel()
    cumulative = torch.tensor(peer.cum_table.astype(np.float64)) / float(peer.cum_table[-1])
    expected = torch.diff(cumulative, prepend=torch.zeros(1))
    torch.testing.assert_close(shares, expected, atol=2 / table.numel(), rtol=0)


def test_dynamic_windows_equal_gensims_loop() -> None:
    """Pairs from context_windows equal those of gensim's loop over j in
    [i - window + b_i, i + window - b_i], clipped to the sentence."""
    rng = random.Random(0)
    sentence_of = torch.tensor(sorted(rng.randrange(12) for _ in range(80)))
    window = 4
    reduced = torch.randint(0, window, (80,), generator=torch.Generator().manual_seed(0))
    expected = set()
    for i in range(80):
        s = int(sentence_of[i])
        first = min(j for j in range(80) if sentence_of[j] == s)
        last = max(j for j in range(80) if sentence_of[j] == s)
        for j in range(
            max(first, i - window + int(reduced[i])),
            min(last + 1, i + window + 1 - int(reduced[i])),
        ):
            if j != i:
                expected.add((i, j))
    got = set()
    for start in range(0, 80, 17):  # in batches, as training reads them
        context, valid = context_windows(sentence_of, reduced, window, start, min(start + 17, 80))
        for row, col in valid.nonzero().tolist():
            got.add((start + row, int(context[row, col])))
    assert got == expected and len(expected) > 100


def test_learning_rate_decays_linearly() -> None:
    config = Word2VecConfig(alpha=0.025, min_alpha=0.0001)
    assert learning_rate(config, 0.0) == 0.025
    assert learning_rate(config, 0.5) == pytest.approx((0.025 + 0.0001) / 2)
    assert learning_rate(config, 1.0) == pytest.approx(0.0001)
    assert learning_rate(config, 1.2) == 0.0001


def _sgns_loss(hidden, positive, negative, weight=1.0):
    """Negative sampling's loss for one input: -log σ(u_o·h) - w Σ_k log σ(-u_k·h)."""
    return (
        -torch.nn.functional.logsigmoid(positive @ hidden)
        - weight * torch.nn.functional.logsigmoid(-(negative @ hidden)).sum()
    )


@pytest.mark.parametrize("shared", [False, True])
def test_skipgram_step_is_sgd_on_the_negative_sampling_loss(shared: bool) -> None:
    """With distinct words in a batch, the update is W -= α ∇W, U -= α ∇U of the summed loss."""
    model = Word2Vec(
        Vocabulary([f"w{i}" for i in range(30)], [1] * 30),
        Word2VecConfig(vector_size=8, negative=3),
    )
    model.output = torch.randn(30, 8, generator=torch.Generator().manual_seed(3)) * 0.3
    inputs, targets = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    negatives = (
        torch.tensor([6, 7, 8, 9, 10])
        if shared
        else torch.tensor([[6, 7, 8], [9, 10, 11], [12, 13, 14]])
    )
    W = model.input.clone().requires_grad_()
    U = model.output.clone().requires_grad_()
    loss = 0
    for b in range(3):
        negative = U[negatives] if shared else U[negatives[b]]
        loss = loss + _sgns_loss(W[inputs[b]], U[targets[b]], negative, 3 / 5 if shared else 1.0)
    loss.backward()
    alpha = 0.1
    model.update(inputs, None, targets, negatives, alpha)
    torch.testing.assert_close(model.input, (W - alpha * W.grad).detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.output, (U - alpha * U.grad).detach(), atol=1e-6, rtol=0)


def test_cbow_step_gives_every_context_word_the_whole_input_gradient() -> None:
    """gensim's cbow_mean=1: h is the mean of the context vectors, and each of them moves by
    -α ∂loss/∂h (not by its share 1/count of it)."""
    model = Word2Vec(
        Vocabulary([f"w{i}" for i in range(20)], [1] * 20),
        Word2VecConfig(vector_size=6, negative=2),
    )
    model.output = torch.randn(20, 6, generator=torch.Generator().manual_seed(4)) * 0.3
    inputs = torch.tensor([[0, 1, 2, 0], [5, 6, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    targets, negatives = torch.tensor([10, 11]), torch.tensor([[12, 13], [14, 15]])
    W0, U = model.input.clone(), model.output.clone().requires_grad_()
    expected_W = W0.clone()
    loss = 0
    for b, count in enumerate((3, 2)):
        hidden = W0[inputs[b, :count]].mean(0).requires_grad_()
        loss_b = _sgns_loss(hidden, U[targets[b]], U[negatives[b]])
        (grad,) = torch.autograd.grad(loss_b, hidden, retain_graph=True)
        expected_W[inputs[b, :count]] -= 0.1 * grad
        loss = loss + loss_b
    loss.backward()
    model.update(inputs, mask, targets, negatives, 0.1)
    torch.testing.assert_close(model.input, expected_W, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.output, (U - 0.1 * U.grad).detach(), atol=1e-6, rtol=0)


def test_negatives_equal_to_the_target_are_skipped() -> None:
    model = Word2Vec(
        Vocabulary(["a", "b", "c"], [1, 1, 1]), Word2VecConfig(vector_size=4, negative=2)
    )
    model.output = torch.ones(3, 4)
    before_in, before_out = model.input.clone(), model.output.clone()
    # the only negatives are the target itself: only the positive term acts
    model.update(torch.tensor([0]), None, torch.tensor([1]), torch.tensor([[1, 1]]), 0.5)
    g = 0.5 * (1 - torch.sigmoid(before_out[1] @ before_in[0]))
    torch.testing.assert_close(model.output[1], before_out[1] + g * before_in[0])
    torch.testing.assert_close(model.input[0], before_in[0] + g * before_out[1])


def test_training_is_deterministic_per_seed_and_refuses_bad_input(small_sentences) -> None:
    config = Word2VecConfig(vector_size=16, epochs=1, min_count=20)
    one, stats = train_word2vec(small_sentences[:500], config)
    two, _ = train_word2vec(small_sentences[:500], config)
    torch.testing.assert_close(one.input, two.input, rtol=0, atol=0)
    assert stats["words"] == sum(1 for s in small_sentences[:500] for w in s if w in one.index)
    with pytest.raises(LmarchError, match="the corpus holds no words"):
        train_word2vec([[], []], config)
    with pytest.raises(LmarchError, match="no word occurs 20 times or more"):
        train_word2vec([["just", "once"]], config)
    with pytest.raises(LmarchError, match="negative must be at least 1"):
        train_word2vec(small_sentences, Word2VecConfig(negative=0))
    with pytest.raises(LmarchError, match="window must be at least 1"):
        train_word2vec(small_sentences, Word2VecConfig(window=0))


def _train_pair(sentences, config: Word2VecConfig, seed: int) -> tuple[WordVectors, WordVectors]:
    config.seed = seed
    ours, _ = train_word2vec(sentences, config, threads=1)
    peer = gensim_models.Word2Vec(
        sentences, sg=int(config.sg), vector_size=config.vector_size, window=config.window,
        negative=config.negative, sample=config.sample, min_count=config.min_count,
        epochs=config.epochs, seed=seed, workers=1,
    )  # fmt: skip
    return ours.vectors, WordVectors(list(peer.wv.index_to_key), torch.from_numpy(peer.wv.vectors))


def _neighbour_overlap(a: WordVectors, b: WordVectors, words: list[str], k: int = 10) -> float:
    """Mean share of the k nearest neighbours two models agree on, over ``words``."""
    shares = []
    for word in words:
        mine = {w for w, _ in a.neighbors(word, k)}
        theirs = {w for w, _ in b.neighbors(word, k)}
        shares.append(len(mine & theirs) / k)
    return statistics.mean(shares)


@pytest.mark.parametrize("sg", [True, False], ids=["skipgram", "cbow"])
def test_neighbours_agree_with_gensim_as_much_as_gensim_with_itself(small_sentences, sg) -> None:
    """Trained on the same text with the same settings, lmarch's and gensim's nearest neighbours
    overlap at least 90% as much as two gensim runs with different seeds do (words ranked
    50-350: frequent enough to be learned, past the function words)."""
    sentences = word_sentences(TINY_SHAKESPEARE.read_text(encoding="utf-8"))
    config = Word2VecConfig(sg=sg, vector_size=50, epochs=3 if sg else 5)
    ours, theirs = _train_pair(sentences, config, seed=1)
    peer = gensim_models.Word2Vec(
        sentences, sg=int(sg), vector_size=50, epochs=config.epochs, seed=2, workers=1
    )
    theirs_again = WordVectors(list(peer.wv.index_to_key), torch.from_numpy(peer.wv.vectors))
    words = theirs.words[50:350]
    assert ours.words[:10] == theirs.words[:10]
    across = _neighbour_overlap(ours, theirs, words)
    within = _neighbour_overlap(theirs_again, theirs, words)
    assert across >= 0.9 * within, (across, within)
    assert "prince" in {w for w, _ in ours.neighbors("king", 10)}


def _mean_scores(vectors: list[WordVectors]) -> dict[str, float]:
    """Mean over seeds of the analogies answered right and the two Spearman correlations."""
    from lmarch.tasks.word2vec import evaluate_vectors

    rows = [evaluate_vectors(v) for v in vectors]
    return {
        "analogies": statistics.mean(r["analogies"]["correct"] for r in rows),
        "wordsim353": statistics.mean(r["wordsim353"]["spearman"] for r in rows),
        "simlex999": statistics.mean(r["simlex999"]["spearman"] for r in rows),
    }


@pytest.mark.slow
@pytest.mark.parametrize("sg", [True, False], ids=["skipgram", "cbow"])
def test_benchmark_scores_within_ten_percent_of_gensim_on_shakespeare(sg: bool) -> None:
    """The issue's goal, on the whole bundled corpus with gensim's default settings, averaged
    over seeds (one seed's scores move by 10-40% at this scale; CBOW, quicker, gets five):
    lmarch's analogies answered right (of the 2,415 questions inside the vocabulary) and
    WordSim-353 Spearman (110 pairs) reach at least 90% of gensim's. SimLex-999 is near zero for
    both (Shakespeare does not teach modern similarity), so it is held to an absolute margin of
    0.03 instead.

    Measured (analogies right, WordSim, SimLex): skip-gram seeds 1-3 lmarch 92.0, 0.179, 0.053,
    gensim 83.0, 0.148, 0.048; CBOW seeds 1-5 lmarch 63.0, 0.135, -0.016, gensim 62.0, 0.124,
    -0.027."""
    from lmarch.tasks.word2vec import corpus_sentences, train_gensim

    sentences = corpus_sentences("shakespeare")
    ours, theirs = [], []
    for seed in (1, 2, 3) if sg else (1, 2, 3, 4, 5):
        config = Word2VecConfig(sg=sg, seed=seed)
        ours.append(train_word2vec(sentences, config, threads=1)[0].vectors)
        theirs.append(train_gensim(sentences, config, workers=1)[0])
    mine, peer = _mean_scores(ours), _mean_scores(theirs)
    assert mine["analogies"] >= 0.9 * peer["analogies"], (mine, peer)
    assert mine["wordsim353"] >= 0.9 * peer["wordsim353"], (mine, peer)
    assert mine["simlex999"] >= peer["simlex999"] - 0.03, (mine, peer)
    king = {w for w, _ in ours[0].neighbors("king", 10)}
    assert {"prince", "queen"} & king, king
