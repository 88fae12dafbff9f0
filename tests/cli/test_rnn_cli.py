"""The recurrent family through the ``lmarch`` command: train (truncated BPTT) -> sample,
generate, eval on the run folder, resume, and one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmarch.generation import generate
from lmarch.models import RecurrentLM
from lmarch.tasks.evaluate import evaluate_run
from lmarch.train.evaluate import evaluate_tokens
from lmarch.weights.checkpoint import load_run


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """``lmarch train --preset gru-char-tiny``: 60 iterations on 60,000 characters."""
    import contextlib
    import io

    from lmarch.cli.main import main

    root = tmp_path_factory.mktemp("gru_run")
    data = root / "tiny.txt"
    data.write_text(shakespeare_text[:60_000], encoding="utf-8")
    out, stdout = root / "run", io.StringIO()
    argv = [
        "train", "--preset", "gru-char-tiny", "--data", str(data), "--out", str(out),
        "--max-iters", "60", "--eval-interval", "30", "--json",
    ]  # fmt: skip
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    (root / "summary.json").write_text(stdout.getvalue().strip().splitlines()[-1])
    return out


def test_train_writes_a_recurrent_run(gru_run: Path) -> None:
    """The run folder holds the rnn family's config and a model that learnt something."""
    summary = json.loads((gru_run.parent / "summary.json").read_text())
    assert summary["iters"] == 60 and summary["val_loss"] < 3.6  # from ln(61) ~ 4.1
    config = json.loads((gru_run / "config.json").read_text())
    assert config["model"]["family"] == "rnn" and config["model"]["cell"] == "gru"
    assert config["preset"] == "gru-char-tiny"


def test_sample_and_generate_equal_the_library(gru_run: Path, cli) -> None:
    """Greedy `sample` and `generate` print what generate() makes with the loaded model."""
    model, tok, _ = load_run(gru_run)
    assert isinstance(model, RecurrentLM)
    ids = generate(model, torch.tensor([tok.encode("ROMEO:")]), 30)[0].tolist()
    args = ["--temperature", "0", "--max-new-tokens", "30"]
    code, stdout, _ = cli("sample", gru_run, "--prompt", "ROMEO:", *args)
    assert code == 0 and stdout == tok.decode(ids) + "\n"
    code, stdout, _ = cli("generate", gru_run, "ROMEO:", *args)
    assert code == 0 and stdout.strip() == tok.decode(ids[len("ROMEO:") :]).strip()


def test_eval_scores_every_validation_token(gru_run: Path, cli) -> None:
    """`lmarch eval --json` scores every validation token once, reading windows of
    max_positions (4,096) tokens with the state carried through each: evaluate_tokens."""
    data = gru_run.parent / "tiny.txt"
    printed = cli.json("eval", gru_run, "--data", data)
    assert printed == evaluate_run(gru_run, str(data))
    model, tok, _ = load_run(gru_run)
    val = torch.tensor(tok.encode(data.read_text()[54_000:]))
    assert printed["tokens"] == len(val) - 1
    expected = evaluate_tokens(model, val, 4096)["loss"]
    assert printed["loss"] == pytest.approx(expected, abs=1e-5)


def test_resume_goes_on(gru_run: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    shutil.copytree(gru_run, out)
    assert cli.json("train", "--out", out, "--resume", "--max-iters", "70")["iters"] == 70


def test_refusals_are_one_line(small_text_file: Path, tmp_path: Path, cli) -> None:
    base = ["train", "--preset", "lstm-char-tiny", "--data", small_text_file, "--out", tmp_path]
    assert "tie_weights needs n_embd == hidden_size" in cli.error(
        *base, "--set", "tie_weights=true"
    )
    assert "RNNConfig.cell must be one of" in cli.error(*base, "--set", "cell=mamba")
    assert "too few for 8 streams" in cli.error(*base, "--set", "block_size=2000")
