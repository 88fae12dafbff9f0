"""Figures made by lmarch itself (matplotlib, Agg backend: files only, no window)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmarch.weights.run_log import read_metrics  # noqa: E402


def _last_per_iteration(metrics_path: str | Path, *keys: str) -> list[dict[str, Any]]:
    """Rows holding a numeric ``iter`` and every key of ``keys``, one per iteration (the last
    written: a resumed run repeats the iterations after its checkpoint), in iteration order."""
    rows: dict[int, dict[str, Any]] = {}
    for row in read_metrics(metrics_path):
        values = [row.get("iter"), *(row.get(k) for k in keys)]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            rows[int(row["iter"])] = row
    return [rows[i] for i in sorted(rows)]


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Training loss (every logged iteration) and train/val loss at each evaluation, from a
    ``metrics.jsonl`` written by the Trainer, saved as a PNG (or SVG, by extension). A torn
    last line is skipped, and where a resumed run logged an iteration again its last row wins."""
    batches = _last_per_iteration(metrics_path, "loss")
    steps, losses = [r["iter"] for r in batches], [r["loss"] for r in batches]
    evals = _last_per_iteration(metrics_path, "val_loss", "train_loss")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, losses, color="#9bb7d4", linewidth=1, label="train (batch)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing logged yet: no legend to draw
        ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
