"""``lmarch word2vec train|neighbors|analogy|eval`` end to end on a small text file, and bad
input: one line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmarch.classic.word2vec import Word2Vec, Word2VecConfig, train_word2vec
from lmarch.tasks.word2vec import corpus_sentences, evaluate_vectors, load_word2vec, train_gensim

gensim_models = pytest.importorskip("gensim.models")

SETTINGS = ["--dim", "24", "--epochs", "2", "--min-count", "3", "--seed", "7"]


def _as_json(value: dict) -> dict:
    """``value`` as it reads back from the command's JSON line (floats round-trip exactly)."""
    return json.loads(json.dumps(value))


@pytest.fixture
def trained(cli, small_text_file: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "w2v"
    summary = cli.json("word2vec", "train", "--data", small_text_file, "--out", out, *SETTINGS)
    return out, summary


def test_train_saves_the_vectors_the_library_trains(trained, small_text_file) -> None:
    out, summary = trained
    assert sorted(p.name for p in out.iterdir()) == ["vectors.bin", "word2vec.json"]
    config = Word2VecConfig(vector_size=24, epochs=2, min_count=3, seed=7)
    model, stats = train_word2vec(corpus_sentences(str(small_text_file)), config, threads=1)
    vectors, meta = load_word2vec(out)
    assert vectors.words == model.vocab.words
    torch.testing.assert_close(vectors.vectors, model.input, rtol=0, atol=0)
    assert meta["config"] == model.config_dict() and meta["config"]["sg"] is True
    assert summary["words"] == stats["words"] and summary["vocabulary"] == len(vectors) > 300
    # the file is a word2vec binary file that gensim reads as such
    keyed = gensim_models.KeyedVectors.load_word2vec_format(str(out / "vectors.bin"), binary=True)
    assert keyed.index_to_key == vectors.words
    np.testing.assert_array_equal(keyed.vectors, vectors.vectors.numpy())


def test_neighbors_and_analogy_print_what_the_vectors_answer(cli, trained) -> None:
    out, _ = trained
    vectors, _ = load_word2vec(out)
    result = cli.json("word2vec", "neighbors", out, "lord", "-k", "4")
    assert [tuple(p) for p in result["neighbors"]] == vectors.neighbors("lord", k=4)
    code, printed, _ = cli("word2vec", "neighbors", out, "lord", "-k", "4")
    assert code == 0
    assert printed.splitlines() == [f"{w}\t{s:.4f}" for w, s in vectors.neighbors("lord", k=4)]
    result = cli.json("word2vec", "analogy", out, "man", "good", "citizen", "-k", "3")
    assert [tuple(p) for p in result["answers"]] == vectors.analogy("man", "good", "citizen", k=3)
    assert result["query"] == ["man", "good", "citizen"]


def test_eval_scores_both_models_as_the_library_does(cli, trained, small_text_file) -> None:
    out, _ = trained
    vectors, meta = load_word2vec(out)
    result = cli.json("word2vec", "eval", out, "--peer", "--workers", "1")
    assert result["lmarch"] == _as_json(evaluate_vectors(vectors))
    assert result["lmarch"]["analogies"]["total"] > 0
    assert result["lmarch"]["simlex999"]["pairs"] > 10
    config = Word2VecConfig(**meta["config"])
    peer, _ = train_gensim(corpus_sentences(str(small_text_file)), config, workers=1)
    expected = evaluate_vectors(peer)
    seconds = result["gensim"].pop("seconds")
    assert result["gensim"] == _as_json(expected) and seconds > 0
    code, printed, _ = cli("word2vec", "eval", out)
    assert code == 0 and printed.startswith("lmarch: analogies ") and "gensim" not in printed


def test_cbow_and_shared_negatives_train(cli, small_text_file, tmp_path) -> None:
    summary = cli.json(
        "word2vec", "train", "--data", small_text_file, "--out", tmp_path / "c", "--cbow",
        "--shared-negatives", "16", *SETTINGS,
    )  # fmt: skip
    assert summary["config"]["sg"] is False and summary["config"]["shared_negatives"] == 16
    vectors, _ = load_word2vec(tmp_path / "c")
    config = Word2VecConfig(
        sg=False, shared_negatives=16, vector_size=24, epochs=2, min_count=3, seed=7
    )
    model, _ = train_word2vec(corpus_sentences(str(small_text_file)), config, threads=1)
    torch.testing.assert_close(vectors.vectors, model.input, rtol=0, atol=0)
    start = Word2Vec(model.vocab, config).input  # the same seed's starting table
    assert (vectors.vectors - start).norm() > 0.1 * start.norm()


def test_bad_input_is_one_line(cli, trained, tmp_path) -> None:
    out, _ = trained
    model = str(tmp_path / "m")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert "holds no text" in cli.error("word2vec", "train", "--data", empty, "--out", model)
    marks = tmp_path / "marks.txt"
    marks.write_text("-- !! 12\n\n...\n", encoding="utf-8")
    assert f"corpus {marks} holds no words" in cli.error(
        "word2vec", "train", "--data", marks, "--out", model
    )
    rare = tmp_path / "rare.txt"
    rare.write_text("each word here once\n", encoding="utf-8")
    assert "no word occurs 5 times or more" in cli.error(
        "word2vec", "train", "--data", rare, "--out", model
    )
    assert "negative must be at least 1" in cli.error(
        "word2vec", "train", "--data", rare, "--out", model, "--negative", "0"
    )
    assert "not allowed with argument --sg" in cli.error(
        "word2vec", "train", "--sg", "--cbow", "--out", model
    )
    assert not Path(model).exists()
    assert "the word 'zebra' is not in the vocabulary" in cli.error(
        "word2vec", "neighbors", out, "zebra"
    )
    assert "the word 'zebra' is not in the vocabulary" in cli.error(
        "word2vec", "analogy", out, "man", "zebra", "woman"
    )
    missing = str(tmp_path / "nowhere")
    for command in (("neighbors", missing, "king"), ("eval", missing)):
        assert f"no word2vec model in {missing}" in cli.error("word2vec", *command)
