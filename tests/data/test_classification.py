"""Classification data: the JSONL reader and its errors, splits, and the shakespeare-genre task."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lmarch.data.classification import (
    ClassificationBatches,
    Example,
    load_classification_data,
    play_passages,
    read_jsonl_examples,
    shakespeare_genre,
    split_examples,
    split_plays_by_genre,
    spoken_lines,
)
from lmarch.data.corpus import Document, shakespeare_documents
from lmarch.errors import LmarchError

GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]


def test_genre_split_keeps_every_play_on_one_side() -> None:
    """No play is in both train and test; every genre is on both sides; 28 / 10 plays."""
    train, test = split_plays_by_genre(shakespeare_documents())
    train_names, test_names = {d.name for d in train}, {d.name for d in test}
    assert not train_names & test_names
    assert len(train_names | test_names) == 38
    assert sorted({d.genre for d in train}) == GENRES == sorted({d.genre for d in test})
    assert Counter(d.genre for d in test) == {
        "comedies": 2, "histories": 3, "problems": 1, "roman": 1, "romances": 1, "tragedies": 2,
    }  # fmt: skip


def test_genre_task_examples_follow_the_play_split() -> None:
    """Every example's play (its group) sits on one side only; the task is deterministic."""
    data = shakespeare_genre(train_passages_per_play=10, test_passages_per_play=5)
    train_groups = {ex.group for ex in data.train}
    test_groups = {ex.group for ex in data.test}
    assert not train_groups & test_groups
    assert len(train_groups) == 28 and len(test_groups) == 10
    assert len(data.train) == 280 and len(data.test) == 50
    assert data.labels == GENRES
    again = shakespeare_genre(train_passages_per_play=10, test_passages_per_play=5)
    assert again.train == data.train and again.test == data.test
    other_seed = shakespeare_genre(train_passages_per_play=10, test_passages_per_play=5, seed=1)
    assert {ex.group for ex in other_seed.test} != test_groups


def test_passages_are_five_spoken_lines() -> None:
    doc = Document("HAMLET:\na\nb\nc\n\nHORATIO:\nd\ne\nf\ng\nh\ni\nj\n", "P", "tragedies")
    assert spoken_lines(doc) == list("abcdefghij")
    assert play_passages(doc) == ["a\nb\nc\nd\ne", "f\ng\nh\ni\nj"]
    assert play_passages(doc, 3) == ["a\nb\nc", "d\ne\nf", "g\nh\ni"]
    assert play_passages(doc, 2, max_passages=2) == ["a\nb", "e\nf"]  # evenly spaced
    hamlet = next(d for d in shakespeare_documents() if d.name == "Hamlet")
    passages = play_passages(hamlet)
    assert len(passages) > 500
    assert all(len(p.split("\n")) == 5 for p in passages)
    assert not any(
        line.endswith(":") and line.isupper() for p in passages for line in p.split("\n")
    )


def _write(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_jsonl_reader_and_split(tmp_path) -> None:
    path = tmp_path / "toy.jsonl"
    rows = [{"text": f"text {i}", "label": "a" if i % 2 else 1} for i in range(20)]
    _write(path, rows[:10] + [""] + rows[10:])
    examples = read_jsonl_examples(path)
    assert len(examples) == 20 and examples[0] == Example("text 0", "1", "toy.jsonl:1")
    data = load_classification_data(str(path), test_fraction=0.2)
    assert data.labels == ["1", "a"]
    assert Counter(ex.label for ex in data.test) == {"1": 2, "a": 2}
    assert len(data.train) == 16
    assert load_classification_data(str(path), test_fraction=0.2).test == data.test
    # a sibling X.test.jsonl is used as the test set instead of a split
    _write(tmp_path / "toy.test.jsonl", [{"text": "held out", "label": "a"}])
    data = load_classification_data(str(path))
    assert len(data.train) == 20 and [ex.text for ex in data.test] == ["held out"]


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        (['{"text": "a", "label": "x"}', "{not json"], "line 2: not valid JSON"),
        ([{"text": "a"}], 'line 1: "label" must be'),
        ([{"label": "x"}], 'line 1: no non-empty "text"'),
        ([{"text": "  ", "label": "x"}], 'line 1: no non-empty "text"'),
        (["[1, 2]"], "line 1: not a JSON object"),
        ([""], "holds no examples"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "only one label"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, rows, needle) -> None:
    path = tmp_path / "bad.jsonl"
    _write(path, rows)
    with pytest.raises(LmarchError, match=None) as info:
        load_classification_data(str(path))
    assert needle in str(info.value) and "bad.jsonl" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(LmarchError, match="data file not found"):
        load_classification_data(str(tmp_path / "nope.jsonl"))


def test_split_examples_is_stratified_and_deterministic() -> None:
    examples = [Example(f"t{i}", "ab"[i % 3 == 0]) for i in range(30)]
    train, test = split_examples(examples, 0.3, seed=0)
    assert len(train) + len(test) == 30 and not set(map(id, train)) & set(map(id, test))
    assert Counter(ex.label for ex in test) == {"a": 6, "b": 3}
    assert split_examples(examples, 0.3, seed=0) == (train, test)


def test_classification_batches() -> None:
    batches = ClassificationBatches(
        [[2, 7, 3], [2, 8, 9, 3]], [[0, 0, 0], [0, 0, 0, 0]], [0, 1], 5, pad_id=0, seed=1
    )
    ids, mask, types, labels = batches.sample()
    assert ids.shape == mask.shape == types.shape and ids.shape[0] == 5
    for row, label in zip(ids, labels):
        assert (row[1] == 7) == (label == 0)
    assert torch.equal((ids != 0).long(), mask)
