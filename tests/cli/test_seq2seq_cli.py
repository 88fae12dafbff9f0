"""``lmarch translate`` / ``lmarch summarize``: train, run, eval and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmarch.data.shakespeare_tasks import SPEAKERS_TASK
from lmarch.generation.seq2seq import greedy_decode
from lmarch.tasks import seq2seq

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = "Before we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def bart(tiny_bart_folder: Path) -> Path:
    return tiny_bart_folder


def test_run_prints_the_models_greedy_output(cli, bart: Path) -> None:
    loaded = seq2seq.load_seq2seq(bart)
    ids = torch.tensor([seq2seq.source_ids(loaded, LINE)])
    generated = greedy_decode(loaded.model, ids, torch.ones_like(ids), max_new_tokens=16)[0, 1:]
    eos = loaded.model.config.eos_token_id
    cut = generated.tolist().index(eos) if eos in generated.tolist() else len(generated)
    expected = loaded.tokenizer.decode(generated[:cut].tolist())
    code, out, err = cli("translate", "run", bart, LINE, "--max-new-tokens", "16")
    assert code == 0, err
    assert out == expected + "\n"
    beams = cli.json("translate", "run", bart, LINE, "--max-new-tokens", "16", "--num-beams", "2")
    assert beams == [{"source": LINE, "output": seq2seq.translate_texts(loaded, [LINE], 2, 16)[0]}]


def test_train_then_eval_json(cli, bart: Path, tmp_path: Path) -> None:
    rows = seq2seq.read_rows(SPEAKERS_TASK, "train")[:40]
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"source": r.source[:150], "target": r.target}) + "\n" for r in rows)
    )
    out = tmp_path / "run"
    summary = cli.json(
        "summarize", "train", "--model", bart, "--data", data, "--out", out,
        "--max-iters", "4", "--batch-size", "4", "--eval-rows", "3",
    )  # fmt: skip
    assert summary["iters"] == 4 and summary["task"] == "summarize"
    assert summary["eval"]["rows"] == 3  # the file's last 10% (4 rows), first 3 scored
    assert json.loads((out / "seq2seq_task.json").read_text())["task"] == "summarize"
    result = cli.json("summarize", "eval", out, "--data", SPEAKERS_TASK, "--limit", "4")
    test_rows = seq2seq.read_rows(SPEAKERS_TASK, "test")[:4]
    outputs = seq2seq.translate_texts(out, [r.source for r in test_rows])
    expected = seq2seq.score_outputs(outputs, [r.target for r in test_rows])
    assert {k: result[k] for k in expected} == expected
    assert result["rows"] == 4 and result["split"] == "test" and result["num_beams"] == 1


def test_bad_input_is_one_line(cli, bart: Path, tmp_path: Path, tiny_run: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n\n{"source": "c", "target": "d"}\n')
    line = cli.error("translate", "eval", bart, "--data", bad)
    assert "bad.jsonl:2: empty row" in line
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
    line = cli.error("translate", "train", "--model", bart, "--data", bad, "--out", tmp_path / "o")
    assert 'bad.jsonl:2: row without "target"' in line
    long = " ".join([LINE] * 30)
    line = cli.error("translate", "run", bart, long, "--no-truncate")
    assert "more than the encoder's 64" in line
    code, out, err = cli("translate", "run", bart, long, "--max-new-tokens", "3")
    assert code == 0 and "notice: source of" in err and "cut to the encoder's 64" in err
    line = cli.error("translate", "run", tiny_run, LINE)
    assert "translate run needs an encoder-decoder" in line
    line = cli.error("summarize", "train", "--model", "t5-tinny", "--data", SPEAKERS_TASK,
                     "--out", tmp_path / "o")  # fmt: skip
    assert "unknown preset 't5-tinny'" in line
    line = cli.error("summarize", "eval", bart, "--data", SPEAKERS_TASK, "--split", "dev")
    assert "unknown split 'dev'" in line
    line = cli.error("translate", "eval", bart, "--data", tmp_path / "none.jsonl")
    assert "data not found" in line
    line = cli.error("translate", "run", bart, LINE, "--num-beams", "0")
    assert "--num-beams must be at least 1" in line


def test_train_a_preset_on_bundled_rows(cli, tmp_path: Path) -> None:
    from lmarch.data.shakespeare_tasks import PIG_LATIN_TASK, write_task_jsonl

    data = tmp_path / "valid.jsonl"
    write_task_jsonl(PIG_LATIN_TASK, "valid", data)
    out = tmp_path / "run"
    summary = cli.json(
        "translate", "train", "--model", "transformer-tiny", "--data", data, "--out", out,
        "--set", "n_encoder_layer=1", "--set", "n_decoder_layer=1", "--set", "n_embd=32",
        "--set", "n_head=2", "--set", "intermediate_size=64", "--set", "vocab_size=300",
        "--max-iters", "3", "--batch-size", "4", "--eval-rows", "2",
    )  # fmt: skip
    assert summary["iters"] == 3 and summary["eval"]["rows"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "seq2seq" and config["data"] == str(data)
    assert config["model"]["family"] == "transformer" and config["model"]["n_embd"] == 32
    code, out_text, err = cli("translate", "run", out, "Speak, speak.")
    assert code == 0, err
    assert out_text == seq2seq.translate_texts(out, ["Speak, speak."])[0] + "\n"


def test_fine_tuning_into_the_models_own_folder_is_refused(cli, bart: Path) -> None:
    before = sorted(p.name for p in bart.iterdir())
    line = cli.error(
        "translate", "train", "--model", bart, "--data", "shakespeare-piglatin", "--out", bart
    )
    assert "is the model's own folder" in line
    assert sorted(p.name for p in bart.iterdir()) == before
