"""``lmarch glove train|neighbors``: GloVe vectors trained on a corpus and saved, and the nearest
words in any vector file (:mod:`lmarch.classic.glove`, :mod:`lmarch.classic.vector_io`).

A run folder holds ``vectors.txt`` (GloVe's text format, most frequent word first) and
``glove.json`` (the settings and the run's figures), both written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmarch.classic.glove import GloveConfig, train_glove
from lmarch.classic.vector_io import read_vectors, write_vectors
from lmarch.classic.vectors import WordVectors
from lmarch.data.corpus import load_documents
from lmarch.errors import LmarchError
from lmarch.tokenizers.base import write_json_file

VECTORS_FILE = "vectors.txt"
SETTINGS_FILE = "glove.json"
RUN_VECTOR_FILES = (VECTORS_FILE, "vectors.bin")  # the files of glove and word2vec run folders


def train_glove_run(
    data: str,
    out: str | Path,
    config: GloveConfig,
    progress: Callable[[int, float], None] | None = None,
    threads: int | None = None,
) -> dict:
    """Train GloVe on corpus ``data`` (``shakespeare``, ``tinyshakespeare``, a file, folder or
    ``.jsonl``, as :func:`lmarch.data.corpus.load_documents`; each document its own window
    span) and save the run in folder ``out`` (``threads``: torch threads for the run). Returns the
    summary written to ``glove.json``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmarchError(f"--out {out} is a file, not a folder")
    documents = load_documents(data)
    result = train_glove([d.text for d in documents], config, progress, threads)
    out.mkdir(parents=True, exist_ok=True)
    write_vectors(result.vectors, out / VECTORS_FILE, "glove")
    summary = {"data": data, **result.summary(), "vectors_file": str(out / VECTORS_FILE)}
    write_json_file(out / SETTINGS_FILE, summary)
    return summary


def vectors_path(source: str | Path) -> Path:
    """The vector file named by ``source``: the file itself, or in a folder its ``vectors.txt``
    (a ``glove train`` run) or ``vectors.bin`` (a ``word2vec train`` run)."""
    path = Path(source)
    if path.is_dir():
        for name in RUN_VECTOR_FILES:
            if (path / name).is_file():
                return path / name
        raise LmarchError(
            f"{source} holds no {' or '.join(RUN_VECTOR_FILES)}",
            hint="give a folder written by 'lmarch glove train' or 'lmarch word2vec train', or a "
            "vector file",
        )
    if not path.exists():
        raise LmarchError(f"vector file not found: {source}")
    return path


def load_vectors(source: str | Path, errors: str = "strict") -> WordVectors:
    """Vectors from a run folder or a file in any of the three formats (detected)."""
    return read_vectors(vectors_path(source), errors=errors)


def nearest_words(vectors: WordVectors, word: str, k: int = 10) -> dict:
    """``{"word", "neighbors": [{"word", "cosine"}, ...]}``: the ``k`` nearest words by cosine."""
    if k < 1:
        raise LmarchError(f"-k must be at least 1, got {k}")
    pairs = vectors.neighbors(word, k)
    return {"word": word, "neighbors": [{"word": w, "cosine": c} for w, c in pairs]}
