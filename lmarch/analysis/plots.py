"""Figures made by lmarch itself (matplotlib, Agg backend: files only, no window)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Training loss (every logged iteration) and train/val loss at each evaluation, from a
    ``metrics.jsonl`` written by the Trainer, saved as a PNG (or SVG, by extension)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r["iter"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, losses, color="#9bb7d4", linewidth=1, label="train (batch)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
