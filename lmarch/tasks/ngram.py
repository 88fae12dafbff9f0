"""``lmarch ngram``: train an n-gram model on a corpus's train split, save it, score it on the
validation split, sample from it.

A model folder holds ``ngram.safetensors`` (each order's sorted n-gram keys and counts, int64) and
``ngram.json`` (settings, vocabulary, the corpus and split it was trained on, its validation
scores). Both are written to a temporary file and renamed, the JSON last: a folder with a readable
``ngram.json`` holds a complete model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lmarch.classic.ngram import NgramConfig, NgramLM
from lmarch.data.corpus import load_documents, train_val_split
from lmarch.errors import LmarchError
from lmarch.weights.checkpoint import read_model_json, write_json
from lmarch.weights.safetensors_io import atomic_write

MODEL_FILE, META_FILE = "ngram.safetensors", "ngram.json"
FORMAT = "lmarch-ngram/1"


def split_corpus(data: str, val_fraction: float) -> tuple[str, str]:
    """The train and validation text of ``data``, split as ``lmarch train`` splits it."""
    return train_val_split(load_documents(data), val_fraction)


def save_ngram(model: NgramLM, out: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (and ``extra`` facts for the JSON) to the folder ``out``."""
    out = Path(out)
    meta, arrays = model.state()
    meta = {"format": FORMAT, **meta, **(extra or {})}
    atomic_write(out / MODEL_FILE, lambda tmp: save_file(arrays, str(tmp)))
    write_json(out / META_FILE, meta)
    return out


def read_meta(folder: str | Path) -> dict:
    """The JSON of a model folder; a folder without one is refused with a hint."""
    return read_model_json(folder, META_FILE, FORMAT, "n-gram model", "lmarch ngram train")


def load_ngram(folder: str | Path) -> tuple[NgramLM, dict]:
    """The model saved in ``folder`` and its JSON facts."""
    meta = read_meta(folder)
    path = Path(folder) / MODEL_FILE
    try:
        arrays = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc
    return NgramLM.from_state(meta, arrays), meta


def fit_and_score(
    train: str, val: str, config: NgramConfig, sample_tokens: int = 0, seed: int = 0
) -> tuple[NgramLM, dict]:
    """Train on the text ``train``, score the text ``val``; the model and a summary: size,
    training time and tokens/s, validation ``nats_per_token`` / ``bits_per_char`` /
    ``perplexity`` (``None`` for a blank ``val``), and a seeded sample of ``sample_tokens``."""
    start = time.perf_counter()
    model = NgramLM.fit_text(train, config)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    score = model.evaluate_text(val) if val.strip() else None
    eval_s = time.perf_counter() - start
    train_tokens = int(model.counts[-1].sum())  # the highest order counts each prediction once
    summary = {
        "order": config.order,
        "smoothing": config.smoothing,
        "unit": config.unit,
        "vocab_size": len(model.vocab),
        "ngrams": [len(k) for k in model.keys],
        "params": model.num_parameters,
        "discounts": [list(d) for d in model.discounts],
        "train_characters": len(train),
        "train_tokens": train_tokens,
        "train_s": round(train_s, 4),
        "tokens_per_s": round(train_tokens / max(train_s, 1e-9), 1),
        "eval_s": round(eval_s, 4),
        "val": score.as_dict() if score else None,
    }
    if sample_tokens:
        summary["sample"] = model.sample(sample_tokens, seed=seed)
    return model, summary


def train_ngram(
    data: str,
    out: str | Path,
    config: NgramConfig,
    val_fraction: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train on ``data``'s train split, score the validation split, save to ``out``; return the
    summary (also stored in the folder's JSON)."""
    train, val = split_corpus(data, val_fraction)
    model, summary = fit_and_score(train, val, config)
    if log:
        log(f"counted {config.order}-grams of {len(train):,} characters in {summary['train_s']} s")
    summary = {"data": data, "val_fraction": val_fraction, **summary}
    save_ngram(model, out, {"summary": summary})
    return summary


def eval_ngram(folder: str | Path, data: str | None = None) -> dict:
    """Score the model in ``folder`` on the validation split of ``data`` (by default the corpus
    it was trained on), split with the same ``val_fraction``."""
    model, meta = load_ngram(folder)
    facts = meta.get("summary", {})
    data = data or facts.get("data")
    if not data:
        raise LmarchError(f"{folder} does not say what it was trained on", hint="give --data")
    _, val = split_corpus(data, float(facts.get("val_fraction", 0.1)))
    start = time.perf_counter()
    score = model.evaluate_text(val)
    return {
        "data": data,
        "order": model.config.order,
        "smoothing": model.config.smoothing,
        "unit": model.config.unit,
        **score.as_dict(),
        "eval_s": round(time.perf_counter() - start, 4),
    }


def sample_ngram(folder: str | Path, tokens: int, seed: int = 0, prompt: str = "") -> str:
    """``tokens`` tokens drawn from the model in ``folder`` after ``prompt``."""
    model, _ = load_ngram(folder)
    return model.sample(tokens, seed=seed, prompt=prompt)


def describe(scores: dict) -> str:
    """One line of validation figures."""
    return (
        f"perplexity {scores['perplexity']:.2f}, {scores['nats_per_token']:.4f} nats/token, "
        f"{scores['bits_per_char']:.4f} bits/char over {scores['tokens']:,} tokens "
        f"({scores['unknown']:,} unknown)"
    )
