"""metrics.jsonl is appended one whole line at a time and read tolerantly: a run killed in the
middle of a row, then resumed, still ends with its loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmarch.analysis.plots import plot_loss_curve
from lmarch.data.batches import RandomBlockSampler
from lmarch.models import GPT, GPTConfig
from lmarch.train.callbacks import LossPlot
from lmarch.train.config import TrainConfig
from lmarch.train.trainer import Trainer
from lmarch.weights.run_log import append_metrics, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_append_writes_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_metrics(path, {"iter": 1, "loss": 2.5})
    append_metrics(path, {"iter": 2, "loss": 2.25})
    assert path.read_text() == '{"iter": 1, "loss": 2.5}\n{"iter": 2, "loss": 2.25}\n'


def test_a_torn_last_line_is_cut_before_the_next_row(tmp_path: Path) -> None:
    """A run killed mid-row leaves half a line; the resumed run's first row replaces it instead
    of fusing with it, and readers skip it meanwhile."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"iter": 1, "loss": 2.5}\n{"iter": 2, "lo')
    assert read_metrics(path) == [{"iter": 1, "loss": 2.5}]
    append_metrics(path, {"iter": 2, "loss": 2.0})
    assert path.read_text() == '{"iter": 1, "loss": 2.5}\n{"iter": 2, "loss": 2.0}\n'


def test_a_whole_last_row_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"iter": 1, "loss": 2.5}')
    append_metrics(path, {"iter": 2, "loss": 2.0})
    assert read_metrics(path) == [{"iter": 1, "loss": 2.5}, {"iter": 2, "loss": 2.0}]


def test_a_torn_line_longer_than_one_read_block_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"iter": 1}\n{"note": "' + "x" * 10_000)
    append_metrics(path, {"iter": 2})
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n'


def test_reader_skips_lines_that_are_not_objects(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"iter": 1}\n\n[1, 2]\nnot json\n{"iter": 2}\n{"it')
    assert read_metrics(path) == [{"iter": 1}, {"iter": 2}]


def _trainer(text: str, out_dir: Path) -> Trainer:
    ids = torch.tensor(list(text.encode("utf-8")))
    cfg = TrainConfig(
        batch_size=4, max_iters=12, eval_interval=6, eval_iters=2, log_interval=2, seed=0
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return Trainer(
        model,
        RandomBlockSampler(ids[:4000], 16, cfg.batch_size, 0),
        RandomBlockSampler(ids[4000:5000], 16, cfg.batch_size, 1),
        cfg,
        out_dir=out_dir,
        callbacks=[LossPlot()],
    )


def test_resumed_run_with_a_torn_log_plots_its_loss(shakespeare_text: str, tmp_path: Path) -> None:
    """Train 6 of 12 steps, tear the log's last line as a kill would, resume to the end: the
    plot is made and the log holds one whole row per logged iteration."""
    _trainer(shakespeare_text, tmp_path).fit(until=6)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"iter": 7, "loss": 3.')  # killed in the middle of a row
    _trainer(shakespeare_text, tmp_path).fit(resume=True)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    lines = metrics.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole
    logged = [r["iter"] for r in rows if "loss" in r]
    assert logged == [2, 4, 6, 8, 10, 12]
    assert [r["iter"] for r in rows if "val_loss" in r] == [6, 12]


def test_plot_takes_the_last_row_of_a_repeated_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume repeats the iterations after its checkpoint; the plot keeps one point each."""
    path = tmp_path / "m.jsonl"
    for row in [
        {"iter": 2, "loss": 3.0},
        {"iter": 4, "loss": 2.9},
        {"iter": 2, "loss": 3.1},  # logged again after a resume from iteration 0
        {"iter": 4, "loss": 2.7},
        {"iter": 4, "train_loss": 2.8, "val_loss": 2.95},
    ]:
        append_metrics(path, row)
    import matplotlib.axes

    calls = []
    record = lambda self, x, y, *a, **k: calls.append((list(x), list(y)))  # noqa: E731
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    plot_loss_curve(path, tmp_path / "loss.png")
    assert calls[0] == ([2, 4], [3.1, 2.7])
    assert calls[1:] == [([4], [2.8]), ([4], [2.95])]
