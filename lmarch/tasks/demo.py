"""``make demo``: train a small character-level GPT on the bundled Shakespeare, then sample it."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmarch.generation import SamplingConfig, stream_text
from lmarch.loading import load
from lmarch.train.run import train_run

DEMO_PRESET = "gpt-char-tiny"
# About three minutes on two idle CPU cores: ~24k tokens/s at this shape since the fused GPT-2
# block (benchmarks/RESULTS.md), 5000 steps of 768 tokens.
DEMO_SETTINGS = {
    "max_iters": 5000,
    "lr_decay_iters": 5000,
    "eval_interval": 500,
    "eval_iters": 20,
    "learning_rate": 2e-3,
}


def run_demo(out: str | Path = "runs/demo", max_iters: int | None = None) -> str:
    """Train, write checkpoint and loss plot to ``out``, print a 500-character sample and the
    commands to try next. Returns the sample."""
    console = Console()
    out = Path(out)
    settings = dict(DEMO_SETTINGS)
    if max_iters is not None:
        settings.update(max_iters=max_iters, lr_decay_iters=max_iters)
    console.rule("[bold]lmarch demo: a GPT learns Shakespeare")
    result = train_run(DEMO_PRESET, "shakespeare", out, settings, log=console.print)
    console.print(
        f"val loss {result.val_loss:.3f} after {result.iters} iterations "
        f"({result.tokens_per_s:,.0f} tokens/s); checkpoint in {out}/checkpoint, "
        f"loss curve in {out}/loss.png"
    )
    loaded = load(out, quant="none")
    console.rule("[bold]a 500-character sample (temperature 0.8)")
    sample = "".join(
        stream_text(
            loaded.model,
            loaded.tokenizer,
            "\n",
            500,
            SamplingConfig(temperature=0.8),
            seed=1337,
        )
    )
    console.print(sample, markup=False, highlight=False)
    console.rule("[bold]try next")
    console.print(
        f"  lmarch sample {out} --prompt 'ROMEO:' --temperature 0.7\n"
        f"  lmarch eval {out} --data shakespeare\n"
        f"  lmarch train --preset gpt-char-small --out runs/small --max-iters 1000\n"
        f"  lmarch train --out {out} --resume --max-iters {result.iters + 1000}\n"
        "  lmarch presets",
        markup=False,
        highlight=False,
    )
    return sample
