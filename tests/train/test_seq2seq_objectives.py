"""Encoder-decoder runs: T5 learns from span corruption and BART from denoising on real text,
the objective each family takes, the ids the run gives its config, the inverse-square-root
schedule, seq2seq JSONL runs, the CLI with resume, and lmarch.load of the run folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmarch
from lmarch.data.noising import sentinel_count
from lmarch.errors import LmarchError
from lmarch.generation.seq2seq import greedy_decode
from lmarch.models.heads import SEQ2SEQ
from lmarch.models.registry import get_preset, replace_config
from lmarch.train.config import TrainConfig
from lmarch.train.optim import learning_rate_at, transformer_lr
from lmarch.train.run import resolve_objective, seq2seq_token_ids, seq2seq_tokenizer, train_run
from lmarch.train.trainer import Callback

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# small shapes of the tiny presets, so a few dozen steps take seconds on a shared CPU
T5_SMALL = {"n_layer": 1, "n_embd": 64, "n_head": 2, "head_dim": 32, "intermediate_size": 128,
            "vocab_size": 600, "block_size": 32}  # fmt: skip
SEQ2SEQ_SMALL = {"n_encoder_layer": 1, "n_decoder_layer": 1, "n_embd": 64, "n_head": 2,
                 "intermediate_size": 128, "vocab_size": 400, "block_size": 32}  # fmt: skip
FAST = {"batch_size": 16, "eval_iters": 4, "log_interval": 10, "warmup_iters": 5,
        "device": "cpu", "learning_rate": 3e-3, "min_lr": 3e-4}  # fmt: skip


class _Curve(Callback):
    """The validation loss at initialisation (before any step) and the trained model."""

    def on_train_start(self, trainer) -> None:
        self.before = trainer.evaluate()["val_loss"]

    def on_train_end(self, trainer, result) -> None:
        self.model = trainer.model


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("seq2seq") / "shakespeare.txt"
    path.write_text(shakespeare_text[:120_000], encoding="utf-8")
    return path


def _train(preset, text_file, out, objective=None, iters=40, **model):
    curve = _Curve()
    shape = T5_SMALL if get_preset(preset).family == "t5" else SEQ2SEQ_SMALL
    overrides = {**shape, **FAST, "max_iters": iters, "eval_interval": iters, **model}
    result = train_run(preset, str(text_file), out, overrides, callbacks=[curve], log=lambda *_: None,
                       objective=objective)  # fmt: skip
    return result, curve


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("t5") / "run"
    return out, *_train("t5-tiny", text_file, out)


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("bart") / "run"
    return out, *_train("bart-tiny", text_file, out, iters=80)


def test_t5_learns_from_span_corruption(t5_run) -> None:
    """40 steps of 16 corrupted Shakespeare windows: the validation loss (the targets:
    sentinels and the spans they hide) falls by at least 1.5 nats from where an untrained
    model starts (at least ln 600 - 0.5 = 5.9; T5's unit-variance embeddings start above)."""
    _, result, curve = t5_run
    assert curve.before > math.log(600) - 0.5
    assert result.val_loss < curve.before - 1.5, (curve.before, result.val_loss)


def test_bart_learns_from_denoising(bart_run) -> None:
    """80 steps of text infilling + sentence permutation: the validation loss (rebuilding the
    whole window) falls by at least 1.5 nats from its untrained start (at least ln 400 - 0.5)."""
    _, result, curve = bart_run
    assert curve.before > math.log(400) - 0.5
    assert result.val_loss < curve.before - 1.5, (curve.before, result.val_loss)


def test_run_folders_load_as_seq2seq_models(t5_run, bart_run) -> None:
    """lmarch.load gives the trained encoder-decoder (objective seq2seq, the run's family and
    tokenizer) with the same weights, so the same logits and greedy output."""
    for (out, _, curve), family in ((t5_run, "t5"), (bart_run, "bart")):
        loaded = lmarch.load(out)
        assert (loaded.objective, loaded.family) == (SEQ2SEQ, family)
        trained = curve.model.eval()
        for name, tensor in trained.state_dict().items():
            assert torch.equal(tensor, loaded.model.state_dict()[name]), name
        ids = torch.tensor([loaded.tokenizer.encode("My lord, the king is come.")])
        start = torch.full((1, 1), loaded.model.decoder_start_token_id)
        with torch.no_grad():
            assert torch.equal(trained(ids, None, start), loaded.model(ids, None, start))
        assert torch.equal(greedy_decode(trained, ids, max_new_tokens=8),
                           greedy_decode(loaded.model, ids, max_new_tokens=8))  # fmt: skip


def test_t5_run_vocabulary_has_sentinels_and_t5_ids(t5_run) -> None:
    out, _, _ = t5_run
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "span"
    model = config["model"]
    ids = (model["pad_token_id"], model["eos_token_id"], model["decoder_start_token_id"])
    assert ids == (0, 1, 0)
    tokenizer = lmarch.load(out).tokenizer
    assert tokenizer.vocab_size == model["vocab_size"] == 600
    assert sentinel_count(tokenizer) == 100
    assert tokenizer.token_to_id("<extra_id_0>") == 599


def test_each_family_takes_its_objectives() -> None:
    assert resolve_objective("t5", None) == "span"
    assert resolve_objective("bart", None) == "denoise"
    assert resolve_objective("transformer", "seq2seq") == "seq2seq"
    assert resolve_objective("bert", None) == "mlm"
    with pytest.raises(
        LmarchError, match="a t5 model trains with --objective span or seq2seq, not 'denoise'"
    ):
        resolve_objective("t5", "denoise")
    with pytest.raises(
        LmarchError, match="a bart model trains with --objective denoise or seq2seq, not 'clm'"
    ):
        resolve_objective("bart", "clm")
    with pytest.raises(LmarchError, match="--objective span needs an encoder-decoder preset"):
        resolve_objective("gpt", "span")
    with pytest.raises(LmarchError, match="--objective mlm needs a BERT-family preset"):
        resolve_objective("llama", "mlm")


def test_config_ids_come_from_the_tokenizer(shakespeare_text) -> None:
    """BART decodes from </s> and puts <s> first; the Transformer starts from <s>; Marian from
    <pad>, on T5's Unigram layout with a <mask> for denoising."""
    text = shakespeare_text[:20_000]
    cases = {
        "bart-tiny": {"pad_token_id": 1, "eos_token_id": 2, "bos_token_id": 0,
                      "decoder_start_token_id": 2, "forced_eos_token_id": 2},
        "transformer-tiny": {"pad_token_id": 1, "eos_token_id": 2, "bos_token_id": 0,
                             "decoder_start_token_id": 0, "forced_eos_token_id": None},
        "marian-tiny": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None,
                        "decoder_start_token_id": 0, "forced_eos_token_id": 1},
    }  # fmt: skip
    for name, expected in cases.items():
        p = get_preset(name)
        config = p.config if p.tokenizer == "unigram" else replace_config(p.config, vocab_size=300)
        tokenizer = seq2seq_tokenizer(p.family, config, p.tokenizer, text, "")
        assert seq2seq_token_ids(config, tokenizer) == expected, name
    marian = seq2seq_tokenizer("bart", get_preset("marian-tiny").config, "unigram", text, "")
    assert marian.mask_id == 3 and marian.vocab_size <= 2000


def test_inverse_sqrt_schedule_is_the_papers_shape() -> None:
    """Vaswani et al. eq. 3 scaled to peak at learning_rate when step n = warmup: linear
    before, lr * sqrt(warmup / n) after; the setting is refused by name when unknown."""
    cfg = TrainConfig(lr_schedule="inverse_sqrt", learning_rate=2e-3, warmup_iters=100)
    assert learning_rate_at(99, cfg) == pytest.approx(2e-3)
    assert learning_rate_at(49, cfg) == pytest.approx(1e-3)
    assert learning_rate_at(399, cfg) == pytest.approx(1e-3)
    d = 512  # with learning_rate = d^-0.5 warmup^-0.5 it is the paper's own schedule
    paper = TrainConfig(lr_schedule="inverse_sqrt", learning_rate=(d * 4000) ** -0.5,
                        warmup_iters=4000)  # fmt: skip
    for step in (0, 999, 3999, 20000):
        assert learning_rate_at(step, paper) == pytest.approx(transformer_lr(step, d, 4000))
    assert learning_rate_at(0, TrainConfig()) == pytest.approx(1e-3 / 101)  # cosine unchanged
    with pytest.raises(LmarchError, match="TrainConfig.lr_schedule must be one of"):
        TrainConfig(lr_schedule="linear")


def test_transformer_run_logs_the_inverse_sqrt_rates(tmp_path, text_file) -> None:
    """transformer-tiny's preset trains with the paper's schedule: the logged rates follow it."""
    out = tmp_path / "run"
    _train("transformer-tiny", text_file, out, iters=20, warmup_iters=10)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = {r["iter"]: r["lr"] for r in rows if "lr" in r}
    lr = FAST["learning_rate"]
    # the rate logged at iter k is the one step k - 1 used (n = k)
    assert rates[10] == pytest.approx(lr) and rates[20] == pytest.approx(lr * (10 / 20) ** 0.5)


def _reverse_rows(shakespeare_text: str, n: int) -> list[dict]:
    """A line of Shakespeare -> its words in reverse order."""
    lines = [ln.strip() for ln in shakespeare_text.splitlines() if len(ln.split()) >= 3]
    return [{"source": ln, "target": " ".join(reversed(ln.split()))} for ln in lines[:n]]


def test_seq2seq_objective_learns_jsonl_pairs(tmp_path, shakespeare_text) -> None:
    """transformer-tiny on 600 (line -> reversed line) rows: the validation loss falls by at
    least 1.5 nats in 40 steps (label smoothing 0.1, as the paper trains)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _reverse_rows(shakespeare_text, 600)))
    result, curve = _train("transformer-tiny", data, tmp_path / "run", objective="seq2seq")
    assert result.val_loss < curve.before - 1.5, (curve.before, result.val_loss)
    loaded = lmarch.load(tmp_path / "run")
    assert loaded.objective == SEQ2SEQ and loaded.family == "transformer"


TINY_T5_CLI = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--head-dim", "16",
               "--intermediate-size", "64", "--vocab-size", "500", "--block-size", "24",
               "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "3",
               "--warmup-iters", "2"]  # fmt: skip


def test_cli_trains_and_resumes_span_corruption(cli, tmp_path, small_text_file) -> None:
    """`lmarch train --preset t5-tiny --objective span`: 6 steps in one go equal 3 steps then
    --resume to 6 (the same batches, the same losses to the bit)."""
    base = ["train", "--preset", "t5-tiny", "--objective", "span", "--data", small_text_file]
    whole = cli.json(*base, "--out", tmp_path / "a", "--max-iters", "6", *TINY_T5_CLI)
    half = cli.json(*base, "--out", tmp_path / "b", "--max-iters", "3", *TINY_T5_CLI)
    assert half["iters"] == 3
    resumed = cli.json("train", "--out", tmp_path / "b", "--resume", "--max-iters", "6")
    assert resumed["iters"] == whole["iters"] == 6
    assert resumed["val_loss"] == whole["val_loss"] and resumed["train_loss"] == whole["train_loss"]


def test_cli_refuses_bad_rows_and_wrong_objectives(cli, tmp_path, small_text_file) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"source": "a b", "target": "b a"}\n{"source": "c d"}\n')
    line = cli.error("train", "--preset", "t5-tiny", "--objective", "seq2seq", "--data", data,
                     "--out", tmp_path / "r")  # fmt: skip
    assert f'{data}:2: row without "target"' in line
    data.write_text('{"source": "a b", "target": "b a"}\n\n{"source": "c", "target": "d"}\n')
    line = cli.error("train", "--preset", "bart-tiny", "--objective", "seq2seq", "--data", data,
                     "--out", tmp_path / "r")  # fmt: skip
    assert f"{data}:2: empty row" in line
    line = cli.error("train", "--preset", "gpt-char-tiny", "--objective", "denoise", "--data",
                     small_text_file, "--out", tmp_path / "r")  # fmt: skip
    assert "--objective denoise needs an encoder-decoder preset" in line


@pytest.mark.parametrize("preset", ["t5-tiny", "bart-tiny"])
def test_grad_checkpointing_run_equals_the_plain_run(preset, tmp_path, text_file) -> None:
    """The encoder and decoder blocks recomputed in the backward: the same losses to the bit
    after 6 steps, dropout on."""
    results = [
        _train(preset, text_file, tmp_path / str(flag), iters=6, grad_checkpointing=flag,
               dropout=0.1)[0]
        for flag in (False, True)
    ]  # fmt: skip
    assert results[0].train_loss == results[1].train_loss
    assert results[0].val_loss == results[1].val_loss
