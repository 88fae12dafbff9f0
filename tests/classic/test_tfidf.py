"""TF-IDF against scikit-learn's TfidfVectorizer on Shakespeare plays: the same vocabulary and the
same matrix (to 1e-12) over a grid of options, on fitted and on new documents; refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from lmarch.classic.tfidf import Tfidf, TfidfConfig, cosine_similarities, top_terms
from lmarch.data.corpus import shakespeare_documents
from lmarch.errors import LmarchError


@pytest.fixture(scope="module")
def plays() -> list[str]:
    """The opening 25,000 characters of seven plays, one from every sixth in the corpus."""
    return [doc.text[:25_000] for doc in shakespeare_documents()[::6]]


def _both(docs, **options):
    ours = Tfidf(TfidfConfig(**options))
    theirs = TfidfVectorizer(**options)
    return ours, ours.fit_transform(docs), theirs, theirs.fit_transform(docs)


_WEIGHTING = itertools.cycle(
    itertools.product([False, True], [True, False], ["l2", "l1", None], [True, False])
)  # sublinear_tf, smooth_idf, norm, use_idf
_GRID = [
    (ngram, dfs, *next(_WEIGHTING))
    for ngram, dfs in itertools.product(
        [(1, 1), (1, 2), (2, 3)], [(1, 1.0), (2, 0.9), (0.3, 5), (0.0, 6)]
    )
]


@pytest.mark.parametrize("ngram_range,dfs,sublinear,smooth,norm,use_idf", _GRID)
def test_equal_to_scikit_learn(plays, ngram_range, dfs, sublinear, smooth, norm, use_idf) -> None:
    ours, a, theirs, b = _both(
        plays,
        ngram_range=ngram_range,
        min_df=dfs[0],
        max_df=dfs[1],
        sublinear_tf=sublinear,
        smooth_idf=smooth,
        norm=norm,
        use_idf=use_idf,
    )
    assert ours.terms == list(theirs.get_feature_names_out())
    assert ours.vocabulary == {t: int(j) for t, j in theirs.vocabulary_.items()}
    assert a.shape == b.shape and abs(a - b).max() <= 1e-12
    if use_idf:
        np.testing.assert_allclose(ours.idf, theirs.idf_, rtol=0, atol=1e-12)
    new = ["O Romeo, Romeo! wherefore art thou Romeo?", plays[2][:3000], "zzz qqq"]
    assert abs(ours.transform(new) - theirs.transform(new)).max() <= 1e-12


def test_whole_plays_with_bigrams(plays) -> None:
    docs = [doc.text for doc in shakespeare_documents()[:4]]
    ours, a, theirs, b = _both(docs, ngram_range=(1, 2), sublinear_tf=True)
    assert len(ours.terms) > 50_000
    assert ours.terms == list(theirs.get_feature_names_out())
    assert abs(a - b).max() <= 1e-12


def test_top_terms_and_cosine(plays) -> None:
    ours = Tfidf()
    x = ours.fit_transform(plays)
    row = x.getrow(0).toarray().ravel()
    best = top_terms(x, ours.terms, 0, 5)
    assert [w for _, w in best] == sorted(row, reverse=True)[:5]
    assert [t for t, _ in best] == [ours.terms[j] for j in np.argsort(-row, kind="stable")[:5]]
    sims = cosine_similarities(x)
    dense = x.toarray()
    np.testing.assert_allclose(sims, dense @ dense.T, atol=1e-12)  # rows are unit length
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "docs,options,message",
    [
        ([], {}, "no documents"),
        (["a b c", "! ?"], {}, "hold no terms"),
        (["one two", "three four"], {"min_df": 2}, "no terms remain"),
        (["one two"], {"min_df": 2, "max_df": 1}, "fewer documents than min_df"),
        (["x"], {"ngram_range": (2, 1)}, "bad n-gram range 2 1"),
        (["x"], {"norm": "max"}, "unknown norm 'max'"),
        (["x"], {"max_df": 1.5}, r"max_df as a fraction must lie in \[0, 1\]"),
    ],
)
def test_bad_input_is_refused(docs, options, message) -> None:
    with pytest.raises(LmarchError, match=message):
        Tfidf(TfidfConfig(**options)).fit_transform(docs)
