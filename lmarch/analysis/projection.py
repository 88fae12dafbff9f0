"""Word vectors in two dimensions: principal component analysis (Pearson 1901; Hotelling 1933)
of the chosen words' vectors, and a labelled scatter plot.

With the rows X centred (X - mean), the first two right singular vectors V_2 of the SVD
X = U S V^T are the directions of largest variance, and the 2-D coordinates are X V_2. Each
component's sign is fixed so that its largest-magnitude loading is positive (as scikit-learn
does), so the picture does not flip from run to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmarch.classic.vectors import WordVectors
from lmarch.errors import LmarchError


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [n, 2], explained-variance ratio of the two components) of ``vectors``
    [n, d], n >= 2."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise LmarchError("a projection needs at least two vectors")
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:2]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    coords = x @ components.T
    if coords.shape[1] < 2:  # one-dimensional vectors: a zero second axis
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    variance = s**2
    ratio = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return coords, np.pad(ratio, (0, 2 - len(ratio)))


def load_word_vectors(source: str | Path) -> WordVectors:
    """Word vectors from a vector file (word2vec text/binary, GloVe, fastText ``.vec``) or a
    folder ``lmarch word2vec train`` / ``lmarch glove train`` wrote."""
    path = Path(source)
    if path.is_dir():
        from lmarch.tasks.word2vec import load_word2vec

        vectors, _ = load_word2vec(path)
        return vectors
    if not path.is_file():
        raise LmarchError(f"no vector file or folder at {source}")
    from lmarch.classic.vector_io import read_vectors

    return read_vectors(path)


def project_words(
    vectors: object, words: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(the words, their 2-D PCA coordinates, explained-variance ratios); an unknown word is
    refused by name."""
    words = [w for w in words if w]
    missing = [w for w in words if w not in vectors]
    if missing:
        raise LmarchError(
            f"not in the vocabulary: {', '.join(missing)}", hint="choose words the vectors hold"
        )
    if len(words) < 2:
        raise LmarchError("give at least two words", hint="--words king,queen,man,woman")
    matrix = np.stack([np.asarray(vectors[w].float().numpy()) for w in words])
    coords, ratio = pca_2d(matrix)
    return words, coords, ratio


def plot_projection(
    words: Sequence[str], coords: np.ndarray, ratio: np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """A labelled scatter of the 2-D coordinates, axes named with their explained variance."""
    from lmarch.analysis.plots import plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    ax.scatter(coords[:, 0], coords[:, 1], s=18, color="#1f77b4")
    for word, (x, y) in zip(words, coords):
        ax.annotate(word, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=9)
    ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)")
    ax.set_title(title or "word vectors, PCA")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["load_word_vectors", "pca_2d", "plot_projection", "project_words"]
