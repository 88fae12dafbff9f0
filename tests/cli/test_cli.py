"""The ``lmarch`` command: the train -> sample -> eval path, --json contracts, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmarch.generation import generate
from lmarch.tasks.evaluate import evaluate_run
from lmarch.weights.checkpoint import load_run


def test_train_json_summary_and_files(tiny_run) -> None:
    """--json ends with one JSON object carrying the promised keys; the run folder is complete."""
    summary = json.loads((tiny_run.parent / "summary.json").read_text())
    assert summary["iters"] == 30
    assert {"val_loss", "train_loss", "tokens_per_s", "iters"} <= set(summary)
    assert 0 < summary["val_loss"] < 4.2
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "checkpoint" / "model.safetensors").is_file()
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["model"]["block_size"] == 32


def test_eval_json_equals_library(tiny_run, cli) -> None:
    """`lmarch eval --json` prints exactly what evaluate_run computes."""
    data = tiny_run.parent / "tiny.txt"
    printed = cli.json("eval", tiny_run, "--data", data)
    expected = evaluate_run(tiny_run, str(data))
    assert printed["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert printed["perplexity"] == pytest.approx(
        torch.tensor(expected["loss"]).exp().item(), rel=1e-5
    )


def test_sample_temperature_zero_is_greedy(tiny_run, cli) -> None:
    """`--temperature 0` prints the greedy continuation, identical to the library's generate."""
    code, stdout, _ = cli(
        "sample", tiny_run, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "25"
    )
    assert code == 0
    model, tok, _ = load_run(tiny_run)
    ids = generate(model, torch.tensor([tok.encode("ROMEO:")]), 25)[0].tolist()
    assert stdout == tok.decode(ids) + "\n"


def test_sample_with_seed_is_reproducible(tiny_run, cli) -> None:
    """The same seed gives the same sample; another seed a different one."""
    args = ["sample", tiny_run, "--max-new-tokens", "40", "--top-k", "10", "--top-p", "0.9"]
    first = cli(*args, "--seed", "1")[1]
    again = cli(*args, "--seed", "1")[1]
    other = cli(*args, "--seed", "2")[1]
    assert first == again and first != other


def test_resume_continues_to_new_max_iters(tiny_run, tmp_path, cli) -> None:
    """--resume picks up at iteration 30 and goes on to 40 with the saved settings."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    assert cli.json("train", "--out", out, "--resume", "--max-iters", "40")["iters"] == 40
    iters = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters[-1] == 40 and 30 in iters


def test_config_file_set_and_options(tmp_path, small_text_file, cli) -> None:
    """TOML settings apply, --set wins over the file, and an option wins over --set."""
    cfg = tmp_path / "recipe.toml"
    cfg.write_text(
        "[model]\nn_layer = 1\nn_embd = 16\nn_head = 2\nblock_size = 16\n[train]\nbatch_size = 4\n"
    )
    out = tmp_path / "r"
    code, _, _ = cli(
        "train", "--preset", "gpt-char-tiny", "--data", small_text_file, "--out", out,
        "--config", cfg, "--set", "n_embd=24", "--set", "n_head=4", "--n-head", "3",
        "--max-iters", "2",
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["n_embd"] == 24 and saved["model"]["block_size"] == 16
    assert saved["model"]["n_head"] == 3
    assert saved["train"]["batch_size"] == 4 and saved["train"]["max_iters"] == 2


def test_presets_table_lists_parameter_counts_and_use(cli) -> None:
    """GPT-2 small is listed with its 124.44M parameters, nanoGPT's char model with 10.77M; the
    use column says which presets train, which hold real weights and which are shapes only."""
    code, stdout, _ = cli("presets")
    assert code == 0
    assert "124.44M" in stdout and "10.77M" in stdout and "1,557.61M" in stdout
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if "│" in line}
    assert "shape only" in rows["llama3-8b"] and "shape only" in rows["llama2-7b"]
    assert "weights" in rows["smollm2-135m"] and "weights" in rows["minilm-l6"]
    assert "│ train" in rows["gpt-char-tiny"] and "│ train" in rows["bert-tiny"]


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
def test_bad_input_is_one_line_and_exit_2(argv, needle, cli) -> None:
    """Unknown preset, missing file, unknown key, bad value, bad option: one line, code 2."""
    assert needle in cli.error(*argv)
