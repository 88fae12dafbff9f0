"""Scoring a trained run on a corpus's validation split."""

from __future__ import annotations

from pathlib import Path

import torch

from lmarch.data.corpus import load_documents, train_val_split
from lmarch.train.evaluate import evaluate_tokens
from lmarch.weights.checkpoint import load_run


def evaluate_run(run_dir: str | Path, data: str) -> dict[str, float]:
    """Exact loss and perplexity of the run's model on ``data``'s validation split (split as the
    run was trained: same ``val_fraction``)."""
    model, tokenizer, run_config = load_run(run_dir)
    val_fraction = run_config.get("train", {}).get("val_fraction", 0.1)
    _, val_text = train_val_split(load_documents(data), val_fraction)
    tokens = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    return evaluate_tokens(model, tokens, model.max_positions)
