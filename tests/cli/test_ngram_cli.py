"""``lmarch ngram train|sample|eval`` end to end on a small text file, and bad input: one line,
exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmarch.classic.ngram import NgramConfig, NgramLM
from lmarch.data.corpus import load_documents, train_val_split
from lmarch.tasks.ngram import fit_and_score, load_ngram


@pytest.fixture
def trained(cli, small_text_file: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "char5"
    summary = cli.json(
        "ngram", "train", "--data", small_text_file, "--order", "5", "--unit", "char",
        "--smoothing", "kn", "--out", out,
    )  # fmt: skip
    return out, summary


def test_train_saves_a_model_that_scores_as_the_library_does(trained, small_text_file) -> None:
    out, summary = trained
    assert sorted(p.name for p in out.iterdir()) == ["ngram.json", "ngram.safetensors"]
    train, val = train_val_split(load_documents(str(small_text_file)), 0.1)
    model = NgramLM.fit_text(train, NgramConfig(5, "kn", unit="char"))
    expected = model.evaluate_text(val).as_dict()
    assert summary["val"] == pytest.approx(expected, rel=1e-12)
    assert summary["ngrams"] == [len(k) for k in model.keys]
    assert summary["order"] == 5 and summary["unit"] == "char" and summary["smoothing"] == "kn"
    loaded, meta = load_ngram(out)
    assert loaded.vocab == model.vocab and meta["summary"] == summary
    assert 1.5 < summary["val"]["bits_per_char"] < 3.5
    # every character and each line's end is one training prediction
    assert summary["train_tokens"] == len(train) + 1
    assert summary["params"] == sum(summary["ngrams"]) == model.num_parameters


def test_fit_and_score_is_the_api_for_comparisons(shakespeare_text) -> None:
    train, val = shakespeare_text[:50_000], shakespeare_text[50_000:60_000]
    config = NgramConfig(4, "mkn", unit="char")
    model, summary = fit_and_score(train, val, config, sample_tokens=40, seed=3)
    assert summary["sample"] == model.sample(40, seed=3)
    assert summary["val"] == model.evaluate_text(val).as_dict()
    assert summary["tokens_per_s"] == pytest.approx(
        summary["train_tokens"] / summary["train_s"], rel=1e-2
    )


def test_eval_repeats_the_training_split_and_takes_other_data(cli, trained, tmp_path) -> None:
    out, summary = trained
    scores = cli.json("ngram", "eval", out)
    for key in ("tokens", "characters", "nats_per_token", "perplexity", "bits_per_char"):
        assert scores[key] == pytest.approx(summary["val"][key], rel=1e-12)
    other = tmp_path / "other.txt"
    other.write_text("To be, or not to be, that is the question.\n" * 20, encoding="utf-8")
    scores = cli.json("ngram", "eval", out, "--data", other)
    assert scores["data"] == str(other) and scores["tokens"] < summary["val"]["tokens"]


def test_sample_is_seeded_and_continues_the_prompt(cli, trained) -> None:
    out, _ = trained
    first = cli.json("ngram", "sample", out, "--tokens", "60", "--seed", "4", "--prompt", "KING")
    again = cli.json("ngram", "sample", out, "--tokens", "60", "--seed", "4", "--prompt", "KING")
    other = cli.json("ngram", "sample", out, "--tokens", "60", "--seed", "5", "--prompt", "KING")
    assert first == again and first["text"] != other["text"]
    model, _ = load_ngram(out)
    assert first["text"] == model.sample(60, seed=4, prompt="KING")
    assert len(first["text"]) == 60  # one character per token, line ends included
    code, printed, _ = cli(
        "ngram", "sample", out, "--tokens", "60", "--seed", "4", "--prompt", "KING"
    )
    assert code == 0 and printed == "KING" + first["text"] + "\n"


def test_word_add_k_model(cli, small_text_file, tmp_path) -> None:
    summary = cli.json(
        "ngram", "train", "--data", small_text_file, "--order", "2", "--smoothing", "addk",
        "--k", "0.01", "--out", tmp_path / "w2",
    )  # fmt: skip
    meta = json.loads((tmp_path / "w2" / "ngram.json").read_text())
    assert meta["config"] == {
        "order": 2, "smoothing": "addk", "k": 0.01, "discount": None, "unit": "word",
        "nltk_compat": False,
    }  # fmt: skip
    assert summary["val"]["unknown"] > 0 and summary["discounts"] == [[], []]


def test_bad_input_is_one_line(cli, small_text_file, tmp_path) -> None:
    out = str(tmp_path / "m")
    assert "order must be a whole number >= 1, got 0" in cli.error(
        "ngram", "train", "--data", small_text_file, "--order", "0", "--out", out
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert "holds no text" in cli.error("ngram", "train", "--data", empty, "--out", out)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n", encoding="utf-8")
    assert "holds no tokens" in cli.error("ngram", "train", "--data", blank, "--out", out)
    assert "add-k needs k > 0" in cli.error(
        "ngram", "train", "--data", small_text_file, "--k", "0", "--smoothing", "addk",
        "--out", out,
    )  # fmt: skip
    assert "invalid choice: 'wb'" in cli.error("ngram", "train", "--smoothing", "wb", "--out", out)
    missing = str(tmp_path / "nowhere")
    assert f"no n-gram model in {missing}" in cli.error("ngram", "eval", missing)
    assert f"no n-gram model in {missing}" in cli.error("ngram", "sample", missing)
    assert "corpus not found" in cli.error("ngram", "train", "--data", missing, "--out", out)
    assert not Path(out).exists()
