"""The n-gram model: nltk.lm parity (Kneser-Ney, Laplace, Lidstone), a written-out modified
Kneser-Ney as a second oracle, distributions that sum to 1, Chen & Goodman's discounts,
vectorised scoring equal to one-at-a-time probabilities, seeded sampling, and refusals."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from nltk.lm import KneserNeyInterpolated, Laplace, Lidstone
from nltk.lm.preprocessing import padded_everygram_pipeline

from lmarch.classic.ngram import (
    BOS,
    EOS,
    NgramConfig,
    NgramLM,
    detokenize,
    modified_kn_discounts,
    tokenize,
)
from lmarch.errors import LmarchError


@pytest.fixture(scope="module")
def tiny(shakespeare_text: str) -> list[list[str]]:
    """Ten lines of real text as word sentences: small enough for nltk's slow Kneser-Ney
    (it rescans every n-gram for each probability), with repeated words so discounts matter."""
    return tokenize(shakespeare_text[:330], "word")


def _nltk_model(model_cls, order: int, sentences, **kwargs):
    train, vocab = padded_everygram_pipeline(order, sentences)
    ref = model_cls(order=order, **kwargs)
    ref.fit(train, vocab)
    return ref


def _contexts(ref, order: int) -> list[tuple[str, ...]]:
    """Every context nltk counted, each of its shorter suffixes, and two it never saw."""
    out = set()
    for m in range(2, order + 1):
        for context in ref.counts[m]:
            out.update(context[i:] for i in range(len(context)))
    out.add(("never", "seen", "here")[: order - 1])
    out.add(("speak",) * (order - 1))
    return sorted(out)


@pytest.mark.parametrize("order,discount", [(2, 0.1), (3, 0.1), (3, 0.75), (4, 0.1)])
def test_kneser_ney_equals_nltk_on_every_context_and_word(tiny, order, discount) -> None:
    ref = _nltk_model(KneserNeyInterpolated, order, tiny, discount=discount)
    lm = NgramLM.fit(tiny, NgramConfig(order, "kn", discount=discount, nltk_compat=True))
    assert sorted(lm.vocab) == sorted(ref.vocab)
    worst, pairs = 0.0, 0
    for context in _contexts(ref, order):
        ours = lm.distribution(context)
        theirs = np.array([ref.score(w, context) for w in lm.vocab])
        worst = max(worst, float(np.abs(ours - theirs).max()))
        pairs += len(lm.vocab)
    assert pairs > 2000
    assert worst <= 1e-12
    # the one-pair path agrees with the whole-vocabulary path
    assert lm.prob("speak", ("me",)) == pytest.approx(ref.score("speak", ("me",)), abs=1e-12)


@pytest.mark.parametrize("order,k", [(2, 1.0), (3, 1.0), (3, 0.1), (4, 0.01)])
def test_add_k_equals_nltk_laplace_and_lidstone(tiny, order, k) -> None:
    ref = (
        _nltk_model(Laplace, order, tiny)
        if k == 1.0
        else _nltk_model(Lidstone, order, tiny, gamma=k)
    )
    lm = NgramLM.fit(tiny, NgramConfig(order, "addk", k=k, nltk_compat=True))
    worst = 0.0
    for context in _contexts(ref, order):
        theirs = np.array([ref.score(w, context) for w in lm.vocab])
        worst = max(worst, float(np.abs(lm.distribution(context) - theirs).max()))
    assert worst <= 1e-12


def test_perplexity_equals_nltks(shakespeare_text) -> None:
    train = tokenize(shakespeare_text[:5000], "word")
    held_out = tokenize(shakespeare_text[5000:5600], "word")
    ref = _nltk_model(Lidstone, 3, train, gamma=0.5)
    lm = NgramLM.fit(train, NgramConfig(3, "addk", k=0.5, nltk_compat=True))
    scored = []  # every token of each line, then its first </s>, after two <s>
    for s in held_out:
        padded = [BOS, BOS, *s, EOS]
        scored += [tuple(padded[i - 2 : i + 1]) for i in range(2, len(padded))]
    logp = lm.log_probs(held_out)
    assert len(logp) == len(scored)
    assert math.exp(-logp.mean()) == pytest.approx(ref.perplexity(scored), rel=1e-12)


def _reference_modified_kn(sentences, order: int, discounts) -> Callable[[str, tuple], float]:
    """Interpolated modified Kneser-Ney written out with dicts, as Chen & Goodman (1998)
    describe it: raw counts at the highest order, continuation counts N1+(. g) below it, the
    unigram level interpolated with the uniform distribution over the vocabulary less <s>."""
    grams: list[Counter] = [Counter() for _ in range(order + 1)]
    vocab = {EOS, "<UNK>"}
    for sentence in sentences:
        padded = [BOS] * (order - 1) + list(sentence) + [EOS]
        vocab.update(sentence)
        for end in range(order - 1, len(padded)):  # the n-grams ending at each predicted token
            grams[order][tuple(padded[end - order + 1 : end + 1])] += 1
    for m in range(order - 1, 0, -1):  # continuation counts from the order above
        for gram in grams[m + 1]:
            grams[m][gram[1:]] += 1
    totals = [defaultdict(float) for _ in range(order + 1)]
    backoff = [defaultdict(float) for _ in range(order + 1)]
    for m in range(1, order + 1):
        d1, d2, d3 = discounts[m - 1]
        for gram, count in grams[m].items():
            totals[m][gram[:-1]] += count
            backoff[m][gram[:-1]] += d1 if count == 1 else d2 if count == 2 else d3

    def prob(word: str, context: tuple[str, ...]) -> float:
        p = 1.0 / len(vocab)
        for m in range(1, order + 1):
            h = context[len(context) - m + 1 :] if m > 1 else ()
            total = totals[m].get(h, 0.0)
            if total == 0:
                continue
            count = grams[m].get((*h, word), 0)
            d = discounts[m - 1][min(count, 3) - 1] if count else 0.0
            p = (count - d + backoff[m][h] * p) / total
        return p

    return prob


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_modified_kneser_ney_equals_a_written_out_reference(shakespeare_text, order) -> None:
    sentences = tokenize(shakespeare_text[:3000], "word")
    lm = NgramLM.fit(sentences, NgramConfig(order, "mkn"))
    prob = _reference_modified_kn(sentences, order, lm.discounts)
    contexts = {tuple([BOS] * (order - 1))}
    for s in sentences[:20]:
        padded = [BOS] * (order - 1) + s
        contexts.update(tuple(padded[i : i + order - 1]) for i in range(len(s)))
    contexts.add(("unseen", "words", "here")[: order - 1])
    words = [w for w in lm.vocab if w != BOS]
    worst = 0.0
    for context in sorted(contexts):
        ours = lm.distribution(context)
        theirs = np.array([prob(w, context) for w in words])
        worst = max(worst, float(np.abs(ours[1:] - theirs).max()))
    assert worst <= 1e-12


def test_modified_discounts_follow_chen_and_goodman() -> None:
    # n1..n4 = 100, 40, 20, 12: Y = 100/180 = 5/9
    exact = [Fraction(5, 9), Fraction(7, 6), Fraction(5, 3)]
    assert modified_kn_discounts(100, 40, 20, 12) == pytest.approx([float(x) for x in exact])


def test_model_discounts_come_from_its_count_of_counts(shakespeare_text) -> None:
    """The highest order's discounts, from a count-of-counts taken here with a Counter."""
    sentences = tokenize(shakespeare_text[:60_000], "word")
    lm = NgramLM.fit(sentences, NgramConfig(3, "mkn"))
    trigrams = Counter()
    for s in sentences:
        padded = [BOS, BOS, *s, EOS]
        trigrams.update(tuple(padded[i : i + 3]) for i in range(len(padded) - 2))
    of = Counter(trigrams.values())
    assert lm.discounts[2] == pytest.approx(modified_kn_discounts(of[1], of[2], of[3], of[4]))
    kn = NgramLM.fit(sentences, NgramConfig(3, "kn"))
    assert kn.discounts[2] == pytest.approx((of[1] / (of[1] + 2 * of[2]),))


@pytest.mark.parametrize("smoothing", ["kn", "mkn", "addk"])
@pytest.mark.parametrize("unit,order", [("word", 3), ("char", 5), ("char", 1)])
def test_every_distribution_sums_to_one(shakespeare_text, smoothing, unit, order) -> None:
    text = shakespeare_text[:20_000]
    lm = NgramLM.fit_text(text, NgramConfig(order, smoothing, k=0.05, unit=unit))
    sentences = tokenize(text, unit)
    contexts = [(), ("never-seen",), tuple([BOS] * (order - 1))]
    for s in sentences[:: max(1, len(sentences) // 60)]:
        padded = [BOS] * (order - 1) + s
        contexts += [tuple(padded[i : i + order - 1]) for i in range(0, len(s), 3)]
        contexts.append(tuple(padded[-2:]))  # a shorter context
    assert len(contexts) > 150
    sums = np.array([lm.distribution(c).sum() for c in contexts])
    np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("smoothing", ["kn", "mkn", "addk"])
def test_vectorised_scoring_equals_one_token_at_a_time(shakespeare_text, smoothing) -> None:
    lm = NgramLM.fit_text(shakespeare_text[:30_000], NgramConfig(4, smoothing, unit="word"))
    held_out = tokenize(shakespeare_text[150_000:151_000], "word")
    logp = lm.log_probs(held_out)
    one_by_one = []
    for s in held_out:
        padded = [BOS] * 3 + s + [EOS]
        one_by_one += [
            math.log(lm.prob(padded[i], padded[i - 3 : i])) for i in range(3, len(padded))
        ]
    np.testing.assert_allclose(logp, one_by_one, rtol=0, atol=1e-12)
    assert len(logp) == sum(len(s) + 1 for s in held_out)


def test_scores_on_held_out_text_improve_with_order(shakespeare_text) -> None:
    train, val = shakespeare_text[:100_000], shakespeare_text[180_000:]
    scores = {
        n: NgramLM.fit_text(train, NgramConfig(n, "mkn", unit="char")).evaluate_text(val)
        for n in (1, 2, 3, 5)
    }
    bpc = [scores[n].bits_per_char for n in (1, 2, 3, 5)]
    assert bpc == sorted(bpc, reverse=True)
    assert bpc[0] > 4.5 and bpc[-1] < 3.0  # unigram 4.8 bits, 5-gram 2.9 on 100k characters
    s = scores[5]
    assert s.tokens == len(val) + 1 and s.characters == len(val) + 1
    assert s.bits_per_char == pytest.approx(s.nats_per_token / math.log(2))
    assert s.perplexity == pytest.approx(math.exp(s.nats_per_token))


def test_unseen_words_score_as_unknown_with_finite_loss(shakespeare_text) -> None:
    lm = NgramLM.fit_text(shakespeare_text[:20_000], NgramConfig(3, "kn"))
    score = lm.evaluate_text("Xyzzy, plugh the xylophone.")
    assert score.unknown == 3  # Xyzzy, plugh, xylophone
    assert math.isfinite(score.nats) and score.tokens == 7


def test_sampling_is_seeded_and_draws_from_the_distribution(shakespeare_text) -> None:
    lm = NgramLM.fit_text(shakespeare_text[:50_000], NgramConfig(3, "mkn", unit="char"))
    first = lm.sample(80, seed=7, prompt="First Citizen:\n")
    assert first == lm.sample(80, seed=7, prompt="First Citizen:\n")
    assert first != lm.sample(80, seed=8, prompt="First Citizen:\n")
    assert set(first) <= set(lm.vocab[3:]) | {"\n"}
    # the first character after "Th": 3000 seeded draws against the model's distribution
    p = lm.distribution(["T", "h"])
    p[2] = 0.0  # <UNK> is never drawn
    p /= p.sum()
    drawn = Counter(lm.sample(1, seed=s, prompt="Th") for s in range(3000))
    freq = np.array([drawn.get(t, 0) for t in lm.vocab[3:]]) / 3000
    assert 0.5 * np.abs(freq - p[3:]).sum() < 0.04  # total variation
    assert p[lm.index["e"]] > 0.5  # "the", "then", "there"


def test_word_samples_read_as_text(shakespeare_text) -> None:
    lm = NgramLM.fit_text(shakespeare_text[:50_000], NgramConfig(3, "kn"))
    text = lm.sample(40, seed=2, prompt="I pray you")
    assert text.startswith(" ") or text[0] in ",.;:!?\n"
    words = tokenize(text, "word")
    assert sum(len(line) for line in words) + len(words) - 1 == 40  # 40 tokens, line ends too
    assert " ," not in text and " ." not in text
    assert (
        detokenize(["Speak", ",", "speak", ".", EOS, "All", ":"], "word") == "Speak, speak.\nAll:"
    )


def test_state_round_trip_and_refusal_of_a_broken_state(shakespeare_text) -> None:
    lm = NgramLM.fit_text(shakespeare_text[:20_000], NgramConfig(3, "kn", unit="char"))
    meta, arrays = lm.state()
    again = NgramLM.from_state(meta, arrays)
    sentences = tokenize(shakespeare_text[20_000:21_000], "char")
    np.testing.assert_array_equal(again.log_probs(sentences), lm.log_probs(sentences))
    broken = dict(arrays, **{"keys.2": arrays["keys.2"][::-1]})
    with pytest.raises(LmarchError, match="order-2 table is malformed"):
        NgramLM.from_state(meta, broken)
    with pytest.raises(LmarchError, match="missing 'keys.3'"):
        NgramLM.from_state(meta, {k: v for k, v in arrays.items() if k != "keys.3"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"order": 0}, "order must be a whole number >= 1, got 0"),
        ({"smoothing": "witten-bell"}, "unknown smoothing 'witten-bell'"),
        ({"k": 0.0}, "add-k needs k > 0"),
        ({"discount": 1.5}, r"discount must lie in \(0, 1\]"),
        ({"unit": "byte"}, "unknown unit 'byte'"),
        ({"smoothing": "mkn", "nltk_compat": True}, "nltk.lm has no modified Kneser-Ney"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(LmarchError, match=message):
        NgramConfig(**kwargs)


def test_an_empty_corpus_is_refused() -> None:
    with pytest.raises(LmarchError, match="holds no tokens"):
        NgramLM.fit_text("\n  \n", NgramConfig(3, unit="word"))
