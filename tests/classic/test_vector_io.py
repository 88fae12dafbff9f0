"""Vector files: gensim 4.4's own test files read to gensim's words and vectors, bit for bit, and
files written here and by gensim read back exactly in each direction."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmarch.classic.vector_io import (
    FORMATS,
    detect_format,
    read_vector_arrays,
    read_vectors,
    write_vectors,
)
from lmarch.classic.vectors import WordVectors, gensim_test_file
from lmarch.errors import LmarchError, LmarchNotice

gensim_models = pytest.importorskip("gensim.models")
KeyedVectors = gensim_models.KeyedVectors

# (file in gensim/test/test_data, its layout, the unicode errors mode it needs): every file there
# in one of the three layouts. Two hold words that word2vec cut inside a UTF-8 character.
GENSIM_FILES = [
    ("word2vec_pre_kv_c", "word2vec-text", "strict"),
    ("crime-and-punishment.vec", "word2vec-text", "strict"),
    ("lee_fasttext.vec", "word2vec-text", "strict"),
    ("toy-model.vec", "word2vec-text", "strict"),
    ("high_precision.kv.txt", "word2vec-text", "strict"),
    ("EN.1-10.cbow1_wind5_hs0_neg10_size300_smpl1e-05.txt", "word2vec-text", "strict"),
    ("IT.1-10.cbow1_wind5_hs0_neg10_size300_smpl1e-05.txt", "word2vec-text", "strict"),
    ("pang_lee_polarity_fasttext.vec", "word2vec-text", "replace"),
    ("w2v_keyedvectors_load_test.modeldata", "word2vec-text", "replace"),
    ("euclidean_vectors.bin", "word2vec-binary", "strict"),
    ("poincare_vectors.bin", "word2vec-binary", "strict"),
    ("high_precision.kv.bin", "word2vec-binary", "strict"),
    ("test_glove.txt", "glove", "strict"),
]


def gensim_read(path: Path, fmt: str, errors: str = "strict"):
    return KeyedVectors.load_word2vec_format(
        str(path),
        binary=fmt == "word2vec-binary",
        no_header=fmt == "glove",
        unicode_errors=errors,
    )


def assert_same(words: list[str], vectors: torch.Tensor, kv) -> None:
    assert words == kv.index_to_key
    assert vectors.dtype == torch.float32
    assert np.array_equal(vectors.numpy(), kv.vectors)


@pytest.mark.parametrize(("name", "fmt", "errors"), GENSIM_FILES)
def test_gensim_files_read_as_gensim_reads_them(name: str, fmt: str, errors: str) -> None:
    path = gensim_test_file(name)
    assert detect_format(path) == fmt
    words, vectors = read_vector_arrays(path, errors=errors)
    assert_same(words, vectors, gensim_read(path, fmt, errors))
    # the explicit format reads the same; read_vectors wraps it
    wv = read_vectors(path, fmt, errors=errors)
    assert isinstance(wv, WordVectors) and wv.words == words
    assert torch.equal(wv.vectors, vectors)


def test_a_word_cut_inside_a_character_is_refused_by_default() -> None:
    path = gensim_test_file("pang_lee_polarity_fasttext.vec")
    with pytest.raises(UnicodeDecodeError):
        gensim_read(path, "word2vec-text")
    with pytest.raises(LmarchError, match=r"pang_lee_polarity_fasttext\.vec, line 150: .*UTF-8"):
        read_vector_arrays(path)


def test_gensims_damaged_file_is_refused_with_its_line() -> None:
    # pretrained.vec declares 3 vectors and holds 1: gensim stops with EOFError too
    path = gensim_test_file("pretrained.vec")
    with pytest.raises(EOFError):
        gensim_read(path, "word2vec-text")
    with pytest.raises(LmarchError, match=r"pretrained\.vec, line 2: .*1 of the 3 rows"):
        read_vector_arrays(path)


def random_vectors(count: int = 40, dim: int = 7, seed: int = 0) -> WordVectors:
    """Values over many magnitudes and signs, and words in several scripts."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-9, 9, (count, dim), generator=g)
    values = torch.randn(count, dim, generator=g) * scale
    values[0, 0], values[0, 1] = 0.0, -0.0
    words = [f"w{i}" for i in range(count - 4)] + ["été", "слово", "词", "o'er"]
    return WordVectors(words, values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trips_with_gensim_are_exact(tmp_path: Path, fmt: str) -> None:
    wv = random_vectors()
    ours = write_vectors(wv, tmp_path / "ours.vec", fmt)
    assert_same(wv.words, wv.vectors, gensim_read(ours, fmt))
    words, vectors = read_vector_arrays(ours)  # and the format detected
    assert words == wv.words and torch.equal(vectors, wv.vectors)

    kv = KeyedVectors(wv.vector_size)
    kv.add_vectors(wv.words, wv.vectors.numpy())
    theirs = tmp_path / "theirs.vec"
    kv.save_word2vec_format(
        str(theirs), binary=fmt == "word2vec-binary", write_header=fmt != "glove"
    )
    assert detect_format(theirs) == fmt
    words, vectors = read_vector_arrays(theirs)
    assert words == wv.words and torch.equal(vectors, wv.vectors)


def test_binary_layout_is_word2vec_cs(tmp_path: Path) -> None:
    wv = WordVectors(["a", "bé"], torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    path = write_vectors(wv, tmp_path / "v.bin", "word2vec-binary")
    expected = (
        b"2 2\n"
        + b"a "
        + np.array([1.0, -2.0], "<f4").tobytes()
        + b"\n"
        + "bé ".encode()
        + np.array([0.5, 3.0], "<f4").tobytes()
        + b"\n"
    )
    assert path.read_bytes() == expected
    # gensim's layout (no newline after a vector) reads the same
    theirs = b"2 2\na " + expected[6:14] + "bé ".encode() + expected[19:27]
    (tmp_path / "g.bin").write_bytes(theirs)
    words, vectors = read_vector_arrays(tmp_path / "g.bin")
    assert words == ["a", "bé"] and torch.equal(vectors, wv.vectors)


def test_text_layouts_are_exact(tmp_path: Path) -> None:
    wv = WordVectors(["x", "y"], torch.tensor([[0.1, -2.5e-06], [3.0, 1e20]]))
    glove = write_vectors(wv, tmp_path / "g.txt", "glove")
    assert glove.read_text() == "x 0.1 -2.5e-06\ny 3.0 1e+20\n"
    text = write_vectors(wv, tmp_path / "w.txt", "word2vec-text")
    assert text.read_text() == "2 2\nx 0.1 -2.5e-06\ny 3.0 1e+20\n"
    # Windows line ends and blank lines read too
    (tmp_path / "crlf.txt").write_bytes(b"2 2\r\nx 0.1 -2.5e-06\r\n\r\ny 3.0 1e+20\r\n")
    words, vectors = read_vector_arrays(tmp_path / "crlf.txt")
    assert words == ["x", "y"] and torch.equal(vectors, wv.vectors)


def test_repeated_words_keep_the_first_vector_as_gensim(tmp_path: Path) -> None:
    path = tmp_path / "dup.txt"
    path.write_text("3 2\na 1 2\nb 3 4\na 5 6\n")
    with pytest.warns(LmarchNotice, match="1 repeated words"):
        words, vectors = read_vector_arrays(path)
    # gensim 4.4 keeps the first too, but leaves an empty slot (key None) at the end
    kv = gensim_read(path, "word2vec-text")
    assert kv.index_to_key == ["a", "b", None]
    assert np.array_equal(kv.vectors[:2], vectors.numpy())
    assert words == ["a", "b"] and vectors.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_limit_reads_the_first_vectors(tmp_path: Path) -> None:
    path = gensim_test_file("euclidean_vectors.bin")
    words, vectors = read_vector_arrays(path, limit=5)
    kv = KeyedVectors.load_word2vec_format(str(path), binary=True, limit=5)
    assert_same(words, vectors, kv)


def bad(tmp_path: Path, data: bytes, name: str = "bad.vec") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"bad\.vec is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", r"bad\.vec, line 1: neither a word2vec header"),
        (b"hello world\nthis is prose\n", r"bad\.vec, line 1: neither a word2vec header"),
        (b"2 3\na 1 2 3\nb 1 2\n", r"bad\.vec, line 3: 2 numbers where 3 were expected"),
        (b"a 1 2 3\nb 1 2 3 4\n", r"bad\.vec, line 2: 4 numbers where 3 were expected"),
        (b"a 1 2\nb 1 x\n", r"bad\.vec, line 2: 'x' is not a number"),
        (b"1 2\na 1 2\nb 3 4\n", r"bad\.vec, line 3: more rows than the 1 its header declares"),
        (b"900000 300\na 1 2\n", r"declares 900000 vectors of dimension 300, more than its"),
        (b"0 5\n", r"declares 0 vectors"),
    ],
)
def test_bad_files_are_refused_by_line(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(LmarchError, match=message):
        read_vector_arrays(bad(tmp_path, data))


def test_bad_binary_files_are_refused_by_byte_offset(tmp_path: Path) -> None:
    wv = WordVectors(["ab", "cd", "ef"], torch.randn(3, 4))
    whole = write_vectors(wv, tmp_path / "v.bin", "word2vec-binary").read_bytes()
    # the third record starts after the header (4 bytes) and two records of 2 + 1 + 16 + 1 bytes
    cut = bad(tmp_path, whole[:-5])
    with pytest.raises(LmarchError, match=r"bad\.vec, byte 44: ends inside vector 3 of the 3"):
        read_vector_arrays(cut, "word2vec-binary")
    extra = bad(tmp_path, whole + b"junk", "extra.bin")
    with pytest.raises(LmarchError, match=r"extra\.bin, byte 64: data after the 3 vectors"):
        read_vector_arrays(extra)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(LmarchError, match="vector file not found"):
        read_vector_arrays(tmp_path / "nope.txt")
    with pytest.raises(LmarchError, match="unknown vector format 'fasttext'"):
        read_vector_arrays(gensim_test_file("test_glove.txt"), "fasttext")


@pytest.mark.parametrize("word", ["two words", "", "tab\there", "new\nline"])
def test_words_that_cannot_be_written_are_refused(tmp_path: Path, word: str) -> None:
    path = tmp_path / "v.txt"
    path.write_text("kept 1.0\n")
    wv = WordVectors(["ok", word], torch.zeros(2, 1))
    with pytest.raises(LmarchError, match="cannot be written to a vector file"):
        write_vectors(wv, path, "glove")
    assert path.read_text() == "kept 1.0\n"  # the old file is untouched
    assert os.listdir(tmp_path) == ["v.txt"]  # and no temporary file is left


def test_write_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("old 1.0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_vectors(random_vectors(count=5, dim=2), path, "glove")
    assert read_vectors(path).words == ["w0", "été", "слово", "词", "o'er"]
    assert os.listdir(tmp_path) == ["v.txt"]


def test_text_numbers_are_converted_in_blocks(tmp_path: Path, monkeypatch) -> None:
    from lmarch.classic import vector_io

    monkeypatch.setattr(vector_io, "_BLOCK_ROWS", 5)  # many blocks, the last one partial
    path = gensim_test_file("lee_fasttext.vec")
    assert_same(*read_vector_arrays(path), gensim_read(path, "word2vec-text"))
    rows = [f"w{i} {i} {i + 0.5}" for i in range(12)]
    rows[9] = "w9 1 nine"
    with pytest.raises(LmarchError, match=r"bad\.vec, line 10: 'nine' is not a number"):
        read_vector_arrays(bad(tmp_path, "\n".join(rows).encode()))
