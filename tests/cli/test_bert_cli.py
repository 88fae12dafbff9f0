"""The BERT-family commands end to end: `lmarch train --objective mlm|rtd` learns, a pretrained
run is fine-tuned by `lmarch classify train` and used by `classify predict`, and bad input gives
one line and exit code 2."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmarch.cli.main import main
from lmarch.tasks.classify import predict

# shrunk bert-tiny: short sequences, small batches, one evaluation at the end
SHRINK = [
    "--set", "batch_size=16", "--set", "block_size=64", "--set", "eval_iters=5",
    "--set", "warmup_iters=10", "--set", "log_interval=1",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    """`lmarch train --preset bert-tiny --objective mlm --data shakespeare`, 150 iterations."""
    out = tmp_path_factory.mktemp("mlm") / "run"
    argv = [
        "train", "--preset", "bert-tiny", "--objective", "mlm", "--data", "shakespeare",
        "--out", str(out), "--max-iters", "150", *SHRINK,
        "--set", "eval_interval=150", "--set", "lr_decay_iters=150", "--json",
    ]  # fmt: skip
    torch.set_num_threads(1)
    code = main(argv)
    assert code == 0
    return out


def test_mlm_on_shakespeare_lowers_masked_lm_loss(mlm_run) -> None:
    """Masked-LM loss starts near ln(2000) = 7.6 (uniform over the WordPiece vocabulary) and
    falls by more than 1.0 nat in 150 iterations (measured: 7.6 at iteration 1, val 6.19)."""
    rows = _metrics(mlm_run)
    first = next(r["loss"] for r in rows if "loss" in r)
    final = [r for r in rows if "val_loss" in r][-1]
    assert first > 7.3
    assert final["iter"] == 150
    assert final["val_loss"] < 6.5 and first - final["val_loss"] > 1.0
    config = json.loads((mlm_run / "config.json").read_text())
    assert config["objective"] == "mlm" and config["model"]["family"] == "bert"
    assert json.loads((mlm_run / "tokenizer.json").read_text())["type"] == "wordpiece"


def test_rtd_run_lowers_its_loss(tmp_path, small_text_file, cli) -> None:
    """ELECTRA pre-training (generator + discriminator, L_MLM + 50 L_Disc) on a slice of
    Shakespeare: the loss falls (measured: ~42 at iteration 1, val 27.2 after 100 iterations),
    and the discriminator's encoder is what a later task loads."""
    out = tmp_path / "rtd"
    code, stdout, _ = cli(
        "train", "--preset", "bert-tiny", "--objective", "rtd", "--data",
        str(small_text_file), "--out", str(out), "--max-iters", "100", *SHRINK,
        "--set", "eval_interval=100", "--set", "lr_decay_iters=100", "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    first = next(r["loss"] for r in _metrics(out) if "loss" in r)
    assert first > 38.0 and summary["val_loss"] < 31.0 and first - summary["val_loss"] > 8.0
    from lmarch.tasks.embed import load_encoder

    encoder = load_encoder(str(out))
    assert encoder.model.config.n_embd == 128  # the discriminator, not the 32-wide generator


def _toy_rows(n: int, seed: int) -> list[dict]:
    """A trivially separable task in Shakespeare's words: war words vs love words."""
    war = ["sword", "battle", "blood", "soldier", "arms", "drum", "enemy", "war"]
    love = ["love", "kiss", "sweet", "heart", "gentle", "lady", "fair", "woo"]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words, label = (war, "war") if i % 2 == 0 else (love, "love")
        rows.append({"text": " ".join(rng.choices(words, k=6)), "label": label})
    return rows


def test_classify_jsonl_from_a_pretrained_run(mlm_run, tmp_path, cli) -> None:
    """Fine-tune the mlm run on a JSONL task: every held-out and new text gets its label; the
    run folder reloads; `classify predict --json` prints what the library predicts."""
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _toy_rows(48, 0)) + "\n")
    out = tmp_path / "clf"
    code, stdout, _ = cli(
        "classify", "train", "--model", str(mlm_run), "--data", str(data),
        "--out", str(out), "--epochs", "4", "--lr", "2e-3", "--batch-size", "8", "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["accuracy"] == 1.0 and summary["macro_f1"] == 1.0
    assert summary["test_examples"] == 10 and summary["baseline"]["accuracy"] == 1.0
    for name in ("classifier.json", "tokenizer.json", "metrics.json", "confusion.png"):
        assert (out / name).is_file(), name
    texts = ["the drum of war and blood", "sweet lady, gentle heart", "a soldier with his sword"]
    code, stdout, _ = cli("classify", "predict", str(out), *texts, "--json")
    assert code == 0
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert [p["label"] for p in printed] == ["war", "love", "war"]
    expected = predict(out, texts)
    for got, want in zip(printed, expected):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "no label here"}\n')
    return path


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["embed", "no-such-model", "{file}", "--out", "{tmp}/v.npy"],
            "no model at 'no-such-model'",
        ),
        (["embed", "minilm-l6", "/no/such/file.txt", "--out", "{tmp}/v.npy"], "/no/such/file.txt"),
        (["embed", "minilm-l6", "{file}", "--out", "{tmp}/v.txt"], ".npy or .safetensors"),
        (["embed", "gpt-char-tiny", "{file}", "--out", "{tmp}/v.npy"], "no pretrained weights"),
        (["search", "minilm-l6", "q", "--index", "/no/index.txt"], "/no/index.txt"),
        (["search", "minilm-l6", "q", "--index", "{file}", "--top-k", "0"], "--top-k"),
        (["classify", "train", "--data", "{bad}", "--out", "{tmp}/c"], "line 2"),
        (["classify", "train", "--data", "/no/data.jsonl", "--out", "{tmp}/c"], "/no/data.jsonl"),
        (
            ["classify", "train", "--model", "nope", "--data", "{good}", "--out", "{tmp}/c"],
            "'nope'",
        ),
        (
            ["classify", "train", "--data", "{good}", "--out", "{tmp}/c", "--probe-steps", "-1"],
            "--probe-steps must be >= 0",
        ),
        (["classify", "predict", "{tmp}", "some text"], "no classifier"),
        (["classify", "frobnicate"], "frobnicate"),
        (
            ["train", "--preset", "bert-tiny", "--objective", "clm", "--out", "{tmp}/r"],
            "mlm or rtd",
        ),
        (["train", "--preset", "gpt-char-tiny", "--objective", "mlm", "--out", "{tmp}/r"], "BERT"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, bad_jsonl, cli) -> None:
    """Unknown model, missing file, bad JSONL, wrong output type, bad option: one line, code 2."""
    text = tmp_path / "lines.txt"
    text.write_text("one line\nanother line\n")
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in _toy_rows(10, 0)) + "\n")
    argv = [a.format(file=text, tmp=tmp_path, bad=bad_jsonl, good=good) for a in argv]
    assert needle in cli.error(*argv)
