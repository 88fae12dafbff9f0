"""Ready-made Trainer callbacks: a live progress bar and the loss plot at the end."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lmarch.train.trainer import Callback, Trainer, TrainResult


class ProgressBar(Callback):
    """A rich progress bar: iteration, loss, val loss, tokens/s, elapsed and ETA."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self.val = "-"

    def on_train_start(self, trainer: Trainer) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s"
            ),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train",
            total=trainer.config.max_iters,
            completed=trainer.step,
            loss="-",
            val=self.val,
            tps="-",
        )

    def on_log(self, trainer: Trainer, metrics: dict) -> None:
        assert self.progress is not None
        self.progress.update(
            self.task,
            completed=metrics["iter"],
            loss=f"{metrics['loss']:.4f}",
            tps=f"{metrics['tokens_per_s']:,.0f}",
        )

    def on_eval(self, trainer: Trainer, metrics: dict) -> None:
        self.val = f"{metrics['val_loss']:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, val=self.val)
            self.progress.console.log(
                f"iter {metrics['iter']}: train {metrics['train_loss']:.4f}, "
                f"val {metrics['val_loss']:.4f} (ppl {metrics['val_perplexity']:.2f})"
            )

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=result.iters)
            self.progress.stop()


class LossPlot(Callback):
    """Writes ``loss.png`` in the run folder when training ends."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        from lmarch.analysis.plots import plot_loss_curve

        if trainer.out_dir is not None and (trainer.out_dir / "metrics.jsonl").exists():
            plot_loss_curve(
                trainer.out_dir / "metrics.jsonl",
                Path(trainer.out_dir) / "loss.png",
                title=f"{trainer.out_dir.name}: {result.iters} iterations",
            )
