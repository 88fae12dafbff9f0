"""The ``lmarch`` command: the train -> sample -> eval path, --json contracts, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmarch.cli.main import main
from lmarch.generation import generate
from lmarch.tasks.evaluate import evaluate_run
from lmarch.weights.checkpoint import load_run

TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def trained_run(tmp_path, small_text_file, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(
        capsys,
        "train", "--preset", "gpt-char-tiny", "--data", str(small_text_file), "--out", str(out),
        "--max-iters", "30", *TINY, "--set", "eval_interval=15", "--set", "eval_iters=2", "--json",
    )  # fmt: skip
    assert code == 0
    return out, json.loads(stdout.strip().splitlines()[-1])


def test_train_json_summary_and_files(trained_run) -> None:
    """--json ends with one JSON object carrying the promised keys; the run folder is complete."""
    out, summary = trained_run
    assert summary["iters"] == 30
    assert {"val_loss", "train_loss", "tokens_per_s", "iters"} <= set(summary)
    assert 0 < summary["val_loss"] < 4.2
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint" / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["model"]["block_size"] == 32


def test_eval_json_equals_library(trained_run, small_text_file, capsys) -> None:
    """`lmarch eval --json` prints exactly what evaluate_run computes."""
    out, _ = trained_run
    code, stdout, _ = run(capsys, "eval", str(out), "--data", str(small_text_file), "--json")
    assert code == 0
    printed = json.loads(stdout.strip().splitlines()[-1])
    expected = evaluate_run(out, str(small_text_file))
    assert printed["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert printed["perplexity"] == pytest.approx(
        torch.tensor(expected["loss"]).exp().item(), rel=1e-5
    )


def test_sample_temperature_zero_is_greedy(trained_run, capsys) -> None:
    """`--temperature 0` prints the greedy continuation, identical to the library's generate."""
    out, _ = trained_run
    code, stdout, _ = run(
        capsys,
        "sample",
        str(out),
        "--prompt",
        "ROMEO:",
        "--temperature",
        "0",
        "--max-new-tokens",
        "25",
    )
    assert code == 0
    model, tok, _ = load_run(out)
    ids = generate(model, torch.tensor([tok.encode("ROMEO:")]), 25)[0].tolist()
    assert stdout == tok.decode(ids) + "\n"


def test_sample_with_seed_is_reproducible(trained_run, capsys) -> None:
    """The same seed gives the same sample; another seed a different one."""
    out, _ = trained_run
    args = ["sample", str(out), "--max-new-tokens", "40", "--top-k", "10", "--top-p", "0.9"]
    first = run(capsys, *args, "--seed", "1")[1]
    again = run(capsys, *args, "--seed", "1")[1]
    other = run(capsys, *args, "--seed", "2")[1]
    assert first == again and first != other


def test_resume_continues_to_new_max_iters(trained_run, capsys) -> None:
    """--resume picks up at iteration 30 and goes on to 40 with the saved settings."""
    out, _ = trained_run
    code, stdout, _ = run(
        capsys, "train", "--out", str(out), "--resume", "--max-iters", "40", "--json"
    )
    assert code == 0
    assert json.loads(stdout.strip().splitlines()[-1])["iters"] == 40
    iters = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters[-1] == 40 and 30 in iters


def test_config_file_and_set(tmp_path, small_text_file, capsys) -> None:
    """TOML settings apply, and --set wins over the file."""
    cfg = tmp_path / "recipe.toml"
    cfg.write_text(
        "[model]\nn_layer = 1\nn_embd = 16\nn_head = 2\nblock_size = 16\n[train]\nbatch_size = 4\n"
    )
    out = tmp_path / "r"
    code, _, _ = run(
        capsys, "train", "--preset", "gpt-char-tiny", "--data", str(small_text_file), "--out", str(out),
        "--config", str(cfg), "--set", "n_embd=24", "--max-iters", "2",
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["n_embd"] == 24 and saved["model"]["block_size"] == 16
    assert saved["train"]["batch_size"] == 4 and saved["train"]["max_iters"] == 2


def test_presets_table_lists_parameter_counts(capsys) -> None:
    """GPT-2 small is listed with its 124.44M parameters, nanoGPT's char model with 10.77M."""
    code, stdout, _ = run(capsys, "presets")
    assert code == 0
    assert "124.44M" in stdout and "10.77M" in stdout and "1,557.61M" in stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--preset", "gpt-nope", "--out", "x"], "unknown preset 'gpt-nope'"),
        (
            ["train", "--preset", "gpt-char-tiny", "--data", "/no/such.txt", "--out", "x"],
            "/no/such.txt",
        ),
        (["train", "--preset", "gpt-char-tiny", "--out", "x", "--set", "n_layers=3"], "n_layers"),
        (["train", "--preset", "gpt-char-tiny", "--out", "x", "--set", "n_layer=many"], "many"),
        (["train", "--preset", "gpt-char-tiny", "--out", "x", "--bogus"], "--bogus"),
        (["train", "--preset", "gpt-char-tiny"], "--out"),
        (["sample", "/no/run/dir"], "/no/run/dir"),
        (["eval", "/no/run/dir"], "/no/run/dir"),
        (["train", "--out", "/tmp/never-trained-here", "--resume"], "nothing to resume"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys) -> None:
    """Unknown preset, missing file, unknown key, bad value, bad option: one line, code 2."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err
