"""``lmarch word2vec``: train word2vec on a corpus, save the vectors, query and evaluate them.

A model folder holds ``vectors.bin`` (the word vectors in the word2vec binary format, readable by
gensim and word2vec.c's tools) and ``word2vec.json`` (settings, corpus, training statistics),
each written to a temporary file and renamed, the JSON last: a folder with a readable
``word2vec.json`` holds complete vectors.

Evaluation uses the three benchmark files that ship inside gensim 4.4 (``questions-words.txt``
analogies, WordSim-353, SimLex-999); ``peer`` trains ``gensim.models.Word2Vec`` on the same
sentences with the same settings and scores it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmarch.classic.text import word_sentences
from lmarch.classic.vector_io import read_vectors, write_vectors
from lmarch.classic.vectors import GENSIM_PIP, WordVectors, gensim_test_file
from lmarch.classic.word2vec import Word2VecConfig, train_word2vec
from lmarch.data.corpus import load_documents
from lmarch.errors import LmarchError
from lmarch.weights.checkpoint import read_model_json, write_json

VECTORS_FILE, META_FILE = "vectors.bin", "word2vec.json"
FORMAT = "lmarch-word2vec/1"
BENCHMARKS = {
    "analogies": "questions-words.txt",
    "wordsim353": "wordsim353.tsv",
    "simlex999": "simlex999.txt",
}


def corpus_sentences(data: str) -> list[list[str]]:
    """The sentences of ``data`` (a corpus name or path, as ``lmarch train --data``): lower-cased
    words, one sentence per line; a corpus without a word is refused."""
    sentences = [s for doc in load_documents(data) for s in word_sentences(doc.text)]
    if not sentences:
        raise LmarchError(f"corpus {data} holds no words", hint="give a text with some words")
    return sentences


def train_word2vec_run(
    data: str,
    out: str | Path,
    config: Word2VecConfig,
    threads: int | None = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train on all of ``data`` and save to the folder ``out``; return the JSON facts saved."""
    sentences = corpus_sentences(data)
    model, stats = train_word2vec(sentences, config, progress, threads=threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_vectors(model.vectors, out / VECTORS_FILE, format="word2vec-binary")
    meta = {
        "format": FORMAT,
        "data": data,
        "config": model.config_dict(),
        "sentences": len(sentences),
        **stats,
    }
    write_json(out / META_FILE, meta)
    return meta


def load_word2vec(folder: str | Path) -> tuple[WordVectors, dict]:
    """The vectors saved in ``folder`` and its JSON facts; anything else is refused."""
    meta = read_model_json(folder, META_FILE, FORMAT, "word2vec model", "lmarch word2vec train")
    vectors_path = Path(folder) / VECTORS_FILE
    if not vectors_path.is_file():
        raise LmarchError(f"{vectors_path} is missing", hint="train the model again")
    return read_vectors(vectors_path, "word2vec-binary"), meta


def evaluate_vectors(vectors: WordVectors, restrict_vocab: int = 30000) -> dict:
    """Scores on the three gensim benchmark files: ``{"analogies": {accuracy, correct, total,
    oov_ratio}, "wordsim353": {spearman, pearson, pairs, oov_ratio}, "simlex999": {...}}``; a
    benchmark with no pair inside the vocabulary gets ``None`` scores."""
    result = vectors.evaluate_analogies(gensim_test_file(BENCHMARKS["analogies"]), restrict_vocab)
    scores: dict[str, dict] = {
        "analogies": {k: result[k] for k in ("accuracy", "correct", "total", "oov_ratio")}
    }
    for name in ("wordsim353", "simlex999"):
        try:
            scores[name] = vectors.evaluate_word_pairs(
                gensim_test_file(BENCHMARKS[name]), restrict_vocab
            )
        except LmarchError as exc:
            if "no word pair" not in str(exc):
                raise
            scores[name] = {"spearman": None, "pearson": None, "pairs": 0, "oov_ratio": 100.0}
    return scores


def train_gensim(
    sentences: list[list[str]], config: Word2VecConfig, workers: int = 2
) -> tuple[WordVectors, float]:
    """``gensim.models.Word2Vec`` trained on ``sentences`` with the settings of ``config``; its
    vectors and the training seconds (vocabulary building included, as for lmarch)."""
    try:
        from gensim.models import Word2Vec as GensimWord2Vec
    except ImportError:
        raise LmarchError("the gensim peer is not installed", hint=GENSIM_PIP) from None
    start = time.perf_counter()
    model = GensimWord2Vec(
        sentences,
        sg=int(config.sg),
        vector_size=config.vector_size,
        window=config.window,
        negative=config.negative,
        hs=0,
        sample=config.sample,
        min_count=config.min_count,
        epochs=config.epochs,
        alpha=config.alpha,
        min_alpha=config.min_alpha,
        ns_exponent=config.ns_exponent,
        seed=config.seed,
        workers=workers,
    )
    seconds = time.perf_counter() - start
    vectors = torch.from_numpy(model.wv.vectors.copy())
    return WordVectors(list(model.wv.index_to_key), vectors), seconds


def eval_word2vec(folder: str | Path, peer: bool = False, workers: int = 2) -> dict:
    """Scores of the vectors in ``folder`` (:func:`evaluate_vectors`); with ``peer``, also those of
    gensim's word2vec trained on the same corpus with the same settings, under ``"gensim"``."""
    vectors, meta = load_word2vec(folder)
    result = {"model": str(folder), "data": meta["data"], "lmarch": evaluate_vectors(vectors)}
    if peer:
        config = Word2VecConfig(**meta["config"])
        peer_vectors, seconds = train_gensim(corpus_sentences(meta["data"]), config, workers)
        result["gensim"] = evaluate_vectors(peer_vectors)
        result["gensim"]["seconds"] = seconds
    return result


def describe(scores: dict) -> str:
    """One line: analogy accuracy and the two Spearman correlations."""
    analogies = scores["analogies"]
    parts = [
        f"analogies {100 * analogies['accuracy']:.1f}% "
        f"({analogies['correct']}/{analogies['total']} answerable)"
    ]
    for name in ("wordsim353", "simlex999"):
        rho = scores[name]["spearman"]
        shown = "n/a" if rho is None else f"{rho:.3f}"
        parts.append(f"{name} Spearman {shown} ({scores[name]['pairs']} pairs)")
    return ", ".join(parts)
