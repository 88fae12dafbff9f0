"""`lmarch answer train|run|eval` end to end on a tiny BERT folder, and bad input: one line,
exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from lmarch.data.shakespeare_qa import shakespeare_qa
from lmarch.models.bert import BertConfig, BertModel
from lmarch.tasks.answer import evaluate_answerer, run_answer
from lmarch.tokenizers.wordpiece import WordPieceTokenizer
from lmarch.weights.hf_bert import save_hf_bert

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random 2-layer BERT as a Hugging Face folder (config.json, model.safetensors,
    vocab.txt) and 60 train / 12 test shakespeare-qa questions as SQuAD-layout JSONL."""
    root = tmp_path_factory.mktemp("answer")
    data = shakespeare_qa()
    train, test = data.train[:60], data.test[:12]
    tokenizer = WordPieceTokenizer.train([ex.context for ex in train], vocab_size=500)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32,
        intermediate_size=64, dropout=0.0,
    )  # fmt: skip
    model_dir = root / "tiny-bert"
    save_hf_bert(BertModel(config, add_pooler=False), model_dir)
    tokenizer.save_vocab(model_dir / "vocab.txt")
    for name, rows in (("qa.jsonl", train), ("qa.test.jsonl", test)):
        (root / name).write_text("".join(json.dumps(ex.to_row()) + "\n" for ex in rows))
    return root


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """`lmarch answer train` on the folder, 20 steps of 4 windows."""
    from lmarch.cli.main import main

    out = tmp_path_factory.mktemp("run") / "qa"
    code = main(
        [
            "answer", "train", "--model", str(files / "tiny-bert"), "--data",
            str(files / "qa.jsonl"), "--out", str(out), "--max-iters", "20",
            "--set", "batch_size=4", "--set", "max_length=96", "--doc-stride", "48",
            "--set", "device=cpu",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def test_train_writes_a_run_with_scores(trained) -> None:
    summary = json.loads((trained / "metrics.json").read_text())
    assert summary["iters"] == 20 and summary["n"] == 12 and summary["train_examples"] == 60
    assert 0.0 <= summary["exact_match"] <= summary["f1"] <= 100.0
    assert set(summary["baseline"]) == {"first_speaker", "most_frequent_speaker"}
    settings = json.loads((trained / "answer.json").read_text())["settings"]
    assert (settings["batch_size"], settings["max_length"], settings["doc_stride"]) == (4, 96, 48)
    assert (trained / "checkpoint" / "model.safetensors").is_file()


def test_run_prints_what_the_library_answers(trained, cli) -> None:
    context = "SLY:\nI'll pheeze you, in faith.\n\nHostess:\nA pair of stocks, you rogue!"
    question = "Who says: A pair of stocks, you rogue!?"
    got = cli.json("answer", "run", str(trained), "--context", context, question, "--n-best", "3")
    want = run_answer(trained, context, question, n_best=3)
    assert got["answer"] == want["answer"] == context[got["start"] : got["end"]]
    assert [a["text"] for a in got["n_best"]] == [a["text"] for a in want["n_best"]]
    assert len(got["n_best"]) == 3
    code, out, err = cli("answer", "run", str(trained), "--context", context, question)
    assert code == 0 and out == want["answer"] + "\n"
    assert f"characters {want['start']}-{want['end']} of the context" in err


def test_eval_prints_the_library_scores(trained, files, cli) -> None:
    got = cli.json("answer", "eval", str(trained), "--data", str(files / "qa.test.jsonl"))
    want = evaluate_answerer(trained, str(files / "qa.test.jsonl"))
    assert got["n"] == 12
    assert (got["exact_match"], got["f1"]) == (want["exact_match"], want["f1"])
    assert got["baseline"] == want["baseline"]


def test_resume_extends_the_run(trained, files, cli) -> None:
    """--resume with a larger --max-iters continues from the checkpoint at step 20."""
    summary = cli.json(
        "answer", "train", "--data", str(files / "qa.jsonl"), "--out", str(trained),
        "--resume", "--max-iters", "24",
    )  # fmt: skip
    assert summary["iters"] == 24
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r][-1] == 24


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["answer", "train", "--data", "{bad}", "--out", "{tmp}/a"], "line 2: the context holds"),
        (["answer", "train", "--data", "/no/qa.jsonl", "--out", "{tmp}/a"], "/no/qa.jsonl"),
        (
            ["answer", "train", "--model", "nope", "--data", "{good}", "--out", "{tmp}/a"],
            "no model at 'nope'",
        ),
        (
            ["answer", "train", "--model", "gpt-char-tiny", "--data", "{good}", "--out", "{tmp}/a"],
            "no pretrained weights",
        ),
        (
            ["answer", "train", "--data", "{good}", "--out", "{tmp}/a", "--set", "nope=1"],
            "unknown setting 'nope'",
        ),
        (
            ["answer", "train", "--data", "{good}", "--out", "{tmp}/a", "--max-iters", "0"],
            "--max-iters must be >= 1",
        ),
        (
            ["answer", "train", "--data", "{good}", "--out", "{tmp}/a", "--resume"],
            "nothing to resume",
        ),
        (["answer", "run", "{tmp}", "--context", "SLY:\nHo.", "Who?"], "no question-answering run"),
        (["answer", "run", "{tmp}/none", "--context", "c", "q"], "no question-answering run"),
        (["answer", "eval", "{tmp}", "--data", "{good}"], "no question-answering run"),
        (["answer", "run", "{tmp}", "Who?"], "--context"),
        (["answer", "frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, files, cli) -> None:
    bad = tmp_path / "bad.jsonl"
    good_row = (files / "qa.jsonl").read_text().splitlines()[0]
    row = json.loads(good_row)
    row["answers"]["answer_start"] = [row["answers"]["answer_start"][0] + 1]
    bad.write_text(good_row + "\n" + json.dumps(row) + "\n")
    argv = [a.format(tmp=tmp_path, bad=bad, good=files / "qa.jsonl") for a in argv]
    assert needle in cli.error(*argv)


def test_a_question_about_an_empty_context_is_refused(trained, cli) -> None:
    line = cli.error("answer", "run", str(trained), "--context", "  ", "Who?")
    assert "non-empty context" in line
