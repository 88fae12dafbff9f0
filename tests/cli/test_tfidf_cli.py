"""``lmarch tfidf``: top terms and nearest documents as scikit-learn's TfidfVectorizer gives them,
the bundled plays, and bad input (one line, exit code 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from lmarch.data.corpus import shakespeare_documents


@pytest.fixture(scope="module")
def play_files(tmp_path_factory) -> list[Path]:
    """Four plays' opening 20,000 characters, one file each."""
    root = tmp_path_factory.mktemp("plays")
    paths = []
    for doc in shakespeare_documents()[::10]:
        path = root / f"{doc.name.replace(' ', '_').replace(',', '')}.txt"
        path.write_text(doc.text[:20_000], encoding="utf-8")
        paths.append(path)
    return paths


def test_files_report_matches_scikit_learn(cli, play_files) -> None:
    report = cli.json("tfidf", *play_files, "--top", "7", "--ngram-range", "1", "2", "--sublinear")
    texts = [p.read_text(encoding="utf-8") for p in play_files]
    ref = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = ref.fit_transform(texts).toarray()
    terms = ref.get_feature_names_out()
    assert report["terms"] == len(terms) and report["nonzeros"] == int((x != 0).sum())
    sims = x @ x.T
    for i, row in enumerate(report["documents"]):
        assert row["name"] == play_files[i].name
        best = sorted(range(len(terms)), key=lambda j: (-x[i, j], terms[j]))[:7]
        assert [t for t, _ in row["top_terms"]] == [terms[j] for j in best]
        np.testing.assert_allclose([w for _, w in row["top_terms"]], x[i, best], atol=1e-6)
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:3]
        assert [name for name, _ in row["nearest"]] == [play_files[j].name for j in others]


def test_the_bundled_plays(cli) -> None:
    code, out, _ = cli("tfidf", "shakespeare", "--top", "3", "--max-df", "0.5", "--sublinear")
    assert code == 0
    lines = out.splitlines()
    # each play's heaviest terms are its own characters' names
    assert lines[lines.index("Hamlet") + 1].split(", ")[0].split()[0] in {"hamlet", "polonius"}
    hamlet = lines.index("Henry VI, Part 1")
    assert lines[hamlet + 2].startswith("  nearest: Henry VI, Part 2")
    assert lines[-1].startswith("38 documents, ")


def test_bad_input_is_one_line(cli, tmp_path, play_files) -> None:
    missing = tmp_path / "missing.txt"
    assert "corpus not found" in cli.error("tfidf", missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert "holds no text" in cli.error("tfidf", empty)
    assert "bad n-gram range 2 1" in cli.error("tfidf", *play_files, "--ngram-range", "2", "1")
    assert "not a number: 'lots'" in cli.error("tfidf", *play_files, "--min-df", "lots")
    assert "max_df corresponds to fewer documents than min_df" in cli.error(
        "tfidf", *play_files, "--min-df", "5"
    )  # four documents
    assert "no terms remain" in cli.error(
        "tfidf", *play_files, "--min-df", "4", "--ngram-range", "6", "6"
    )
