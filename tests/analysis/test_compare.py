"""lmarch.analysis.compare: the measured architecture table on a small budget of steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmarch.analysis.compare import (
    CompareConfig,
    CompareRow,
    compare_models,
    ordering_verdict,
    plot_curves,
    read_splits,
    resize_to,
)
from lmarch.classic.ngram import NgramConfig, NgramLM
from lmarch.errors import LmarchError
from lmarch.models.registry import count_parameters, get_preset, replace_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmarch.data.corpus import TINY_SHAKESPEARE

    path = tmp_path_factory.mktemp("compare") / "text.txt"
    path.write_text(TINY_SHAKESPEARE.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rows(corpus: Path) -> list[CompareRow]:
    cfg = CompareConfig(
        data=str(corpus), budget_seconds=600, max_steps=30, models=("ngram", "lstm", "gpt"),
        ngram_order=4, curve_points=3, sample_chars=40,
    )  # fmt: skip
    return compare_models(cfg, log=lambda _: None)


def test_every_model_learns_within_its_steps(rows: list[CompareRow], corpus: Path) -> None:
    """Each neural model ends well below the uniform guess ln(V) after 30 steps (a drop of at
    least 0.5 nats/char); the n-gram row is the model counted directly."""
    train, val = read_splits(str(corpus))
    vocab = len(set(train + val))
    by = {r.model: r for r in rows}
    assert [r.model for r in rows] == ["ngram", "lstm", "gpt"]
    for name in ("lstm", "gpt"):
        assert by[name].steps == 30
        assert by[name].val_loss < math.log(vocab) - 0.5, (name, by[name].val_loss)
        assert by[name].params == count_parameters(
            replace_config(get_preset(f"{name}-char-{'small' if name == 'lstm' else 'tiny'}").config,
                           vocab_size=vocab))  # fmt: skip
        assert len(by[name].sample) > 0 and by[name].tokens_per_s > 0
    direct = NgramLM.fit_text(train, NgramConfig(order=4, smoothing="mkn", unit="char"))
    score = direct.evaluate_text(val)
    assert by["ngram"].val_loss == pytest.approx(score.nats / score.characters, rel=1e-12)
    assert by["ngram"].bits_per_char == pytest.approx(by["ngram"].val_loss / math.log(2))


def test_the_run_is_deterministic_with_a_step_cap(rows: list[CompareRow], corpus: Path) -> None:
    cfg = CompareConfig(
        data=str(corpus), budget_seconds=600, max_steps=30, models=("lstm",), sample_chars=40,
        curve_points=3,
    )  # fmt: skip
    again = compare_models(cfg, log=lambda _: None)[0]
    first = next(r for r in rows if r.model == "lstm")
    assert again.val_loss == first.val_loss and again.sample == first.sample


@pytest.mark.parametrize("preset", ["gpt-char-tiny", "llama-tiny", "lstm-char-small"])
def test_match_params_takes_the_widest_model_within_the_budget(preset: str) -> None:
    config = replace_config(get_preset(preset).config, vocab_size=65)
    budget = 300_000
    sized = resize_to(config, budget)
    assert count_parameters(sized) <= budget
    if hasattr(sized, "hidden_size"):
        wider = replace_config(sized, hidden_size=sized.hidden_size + 1, n_embd=sized.n_embd + 1)
    else:
        wider = replace_config(sized, n_embd=sized.n_embd + 2 * sized.n_head)
    assert count_parameters(wider) > budget
    assert count_parameters(sized) > budget * 0.8


def _row(model: str, loss: float) -> CompareRow:
    return CompareRow(model, "", 1, 1.0, 1, 1.0, loss, "")


def test_the_verdict_names_every_broken_pair() -> None:
    ok = [_row("ngram", 2.0), _row("rnn", 1.9), _row("lstm", 1.7), _row("gru", 1.8),
          _row("gpt", 1.5)]  # fmt: skip
    assert ordering_verdict(ok) == (
        "validation loss follows the expected order ngram > rnn > lstm/gru > gpt"
    )
    bad = [_row("ngram", 1.6), _row("rnn", 1.9), _row("lstm", 1.7), _row("gpt", 1.5)]
    assert ordering_verdict(bad) == (
        "the expected order ngram > rnn > lstm > gpt does not hold: ngram (1.600) <= rnn (1.900)"
    )
    assert "no order" in ordering_verdict([_row("gpt", 1.0)])


def test_plot_is_written(rows: list[CompareRow], tmp_path: Path) -> None:
    path = plot_curves(rows, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(LmarchError, match="unknown model"):
        CompareConfig(models=("ngram", "transformer-xl"))
    with pytest.raises(LmarchError, match="budget-seconds"):
        CompareConfig(budget_seconds=0)
    with pytest.raises(LmarchError, match="n-gram order"):
        CompareConfig(ngram_order=0)


def test_stream_evaluation_equals_whole_streams() -> None:
    """evaluate_streams carries each stream's state across windows, so it equals running every
    stream through the model in one piece."""
    from lmarch.models.rnn import RecurrentLM, RNNConfig
    from lmarch.train.evaluate import evaluate_streams

    torch.manual_seed(0)
    model = RecurrentLM(RNNConfig(cell="lstm", vocab_size=11, n_embd=8, hidden_size=16,
                                  n_layer=2, dropout=0.0, block_size=8)).eval()  # fmt: skip
    tokens = torch.randint(0, 11, (203,))
    got = evaluate_streams(model, tokens, block_size=7, streams=4)
    length = 202 // 4
    rows = torch.stack([tokens[b * length : b * length + length + 1] for b in range(4)])
    with torch.no_grad():
        logits = model(rows[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    assert got["tokens"] == 4 * length
    assert got["loss"] == pytest.approx(want.item(), abs=1e-5)
