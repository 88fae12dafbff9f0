"""Scoring a trained run on a corpus's validation split."""

from __future__ import annotations

from pathlib import Path

import torch

from lmarch.data.corpus import load_documents, train_val_split
from lmarch.errors import LmarchError
from lmarch.loading import load
from lmarch.train.evaluate import evaluate_tokens
from lmarch.weights.checkpoint import read_json


def evaluate_run(run_dir: str | Path, data: str) -> dict[str, float]:
    """Exact loss and perplexity of the run's model on ``data``'s validation split (split as the
    run was trained: same ``val_fraction``). The run must hold a next-token model."""
    if not (Path(run_dir) / "config.json").is_file():
        raise LmarchError(
            f"eval scores an lmarch run folder on its own validation split; {run_dir} is not one",
            hint="give the folder 'lmarch train --out' wrote",
        )
    loaded = load(str(run_dir), quant="none").require("causal-lm", "eval")
    run_config = read_json(Path(run_dir) / "config.json")
    val_fraction = run_config.get("train", {}).get("val_fraction", 0.1)
    _, val_text = train_val_split(load_documents(data), val_fraction)
    tokens = torch.tensor(loaded.tokenizer.encode(val_text), dtype=torch.long)
    return evaluate_tokens(loaded.model, tokens, loaded.model.max_positions)
