"""``lmarch glove train|neighbors``: a run folder whose vectors gensim reads, neighbours equal to
gensim's ``most_similar`` on vector files of each format, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmarch.classic.vector_io import read_vectors, write_vectors
from lmarch.classic.vectors import gensim_test_file

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_writes_vectors_gensim_reads_and_neighbors_reads_them(
    cli, tmp_path: Path, small_text_file: Path
) -> None:
    out = tmp_path / "run"
    summary = cli.json(
        "glove", "train", "--data", small_text_file, "--out", out,
        "--dim", "16", "--epochs", "8", "--min-count", "3", "--seed", "2", "--batch-size", "512",
    )  # fmt: skip
    assert summary["settings"]["dim"] == 16 and summary["settings"]["seed"] == 2
    assert summary["vectors_file"] == str(out / "vectors.txt")
    # measured: J 2,883 -> 1,249 (0.43) in 0.6 s
    assert summary["loss_end"] < 0.5 * summary["loss_start"]
    assert len(summary["epoch_losses"]) == 8
    assert json.loads((out / "glove.json").read_text()) == summary
    vectors = read_vectors(out / "vectors.txt", "glove")
    assert len(vectors.words) == summary["vocab_size"] and vectors.vector_size == 16

    keyed_vectors = pytest.importorskip("gensim.models").KeyedVectors
    kv = keyed_vectors.load_word2vec_format(str(out / "vectors.txt"), no_header=True)
    assert kv.index_to_key == vectors.words
    assert np.array_equal(kv.vectors, vectors.vectors.numpy())

    result = cli.json("glove", "neighbors", out, "citizen", "-k", "4")
    expected = vectors.neighbors("citizen", 4)
    assert [(h["word"], h["cosine"]) for h in result["neighbors"]] == expected
    code, text, _ = cli("glove", "neighbors", out, "citizen", "-k", "2")
    assert code == 0 and text.splitlines() == [
        f"  {rank}. {word}  {cosine:.4f}" for rank, (word, cosine) in enumerate(expected[:2], 1)
    ]


@pytest.mark.parametrize("name", ["test_glove.txt", "euclidean_vectors.bin", "lee_fasttext.vec"])
def test_neighbors_of_any_format_equal_gensims(cli, name: str) -> None:
    keyed_vectors = pytest.importorskip("gensim.models").KeyedVectors
    path = gensim_test_file(name)
    kv = keyed_vectors.load_word2vec_format(
        str(path), binary=name.endswith(".bin"), no_header=name == "test_glove.txt"
    )
    word = kv.index_to_key[3]
    result = cli.json("glove", "neighbors", path, word, "-k", "5")
    assert result["word"] == word
    expected = kv.most_similar(word, topn=5)
    assert [h["word"] for h in result["neighbors"]] == [w for w, _ in expected]
    got = [h["cosine"] for h in result["neighbors"]]
    assert np.allclose(got, [c for _, c in expected], rtol=0, atol=1e-5)


def test_refusals_are_one_line(cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "holds no text" in cli.error("glove", "train", "--data", empty, "--out", tmp_path / "a")
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("1 2 3 ... 4, 5!\n")
    line = cli.error("glove", "train", "--data", numbers, "--out", tmp_path / "b")
    assert "the corpus holds no words" in line
    line = cli.error("glove", "train", "--data", "tinyshakespeare", "--out", "x", "--dim", "0")
    assert "GloVe dim must be at least 1, got 0" in line
    line = cli.error("glove", "train", "--out", "x", "--threads", "0")
    assert "--threads must be at least 1, got 0" in line

    glove_file = gensim_test_file("test_glove.txt")
    line = cli.error("glove", "neighbors", glove_file, "shakespeare")
    assert "the word 'shakespeare' is not in the vocabulary (76 words)" in line
    assert "-k must be at least 1" in cli.error("glove", "neighbors", glove_file, "the", "-k", "0")

    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    line = cli.error("glove", "neighbors", png, "the")
    assert "picture.png, line 1: neither a word2vec header nor a 'word v1 ... vd' row" in line
    assert "vector file not found" in cli.error("glove", "neighbors", tmp_path / "nope", "the")
    line = cli.error("glove", "neighbors", tmp_path, "the")
    assert "holds no vectors.txt or vectors.bin" in line
    broken = gensim_test_file("pang_lee_polarity_fasttext.vec")
    assert "line 150: a word is not valid UTF-8" in cli.error("glove", "neighbors", broken, "the")
    result = cli.json("glove", "neighbors", broken, "the", "--unicode-errors", "replace")
    assert len(result["neighbors"]) == 10


def test_neighbors_reads_a_word2vec_run_folder(cli, tmp_path: Path) -> None:
    vectors = read_vectors(gensim_test_file("test_glove.txt"))
    write_vectors(vectors, tmp_path / "vectors.bin", "word2vec-binary")  # as word2vec train saves
    result = cli.json("glove", "neighbors", tmp_path, "of", "-k", "3")
    assert [(h["word"], h["cosine"]) for h in result["neighbors"]] == vectors.neighbors("of", 3)
