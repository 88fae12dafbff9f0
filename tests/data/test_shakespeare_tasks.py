"""The bundled seq2seq tasks: the Pig Latin rule, play boundaries, splits, exact rows."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmarch.data import shakespeare_tasks as st
from lmarch.data.shakespeare_tasks import (
    PIG_LATIN_TASK,
    PLAYS,
    SPEAKERS_TASK,
    SPLITS,
    pig_latin,
    play_speeches,
    split_of_play,
    task_rows,
    write_task_jsonl,
)
from lmarch.errors import LmarchError


@pytest.mark.parametrize(
    "word, expected",
    [
        ("and", "andway"),  # vowel first
        ("speak", "eakspay"),  # consonant cluster moves
        ("quiet", "ietquay"),  # qu moves together
        ("Squire", "Iresquay"),  # s + qu, capital kept at the front
        ("rhythm", "ythmrhay"),  # y after the first letter is a vowel
        ("yes", "esyay"),  # y first is a consonant
        ("hmm", "hmmay"),  # no vowel
        ("Before", "Eforebay"),
        ("ROME", "OMERAY"),  # all capitals
        ("I", "Iway"),
        ("o'er", "oway'erway"),  # an apostrophe splits words
    ],
)
def test_pig_latin_rule(word: str, expected: str) -> None:
    assert pig_latin(word) == expected


def test_pig_latin_keeps_everything_but_words() -> None:
    line = "Before we proceed any further, hear me speak."
    assert pig_latin(line) == "Eforebay eway oceedpray anyway urtherfay, earhay emay eakspay."
    assert pig_latin("-- 1, 2; !?") == "-- 1, 2; !?"


def test_plays_are_found_in_order_with_their_sizes() -> None:
    speeches = play_speeches()
    assert [s.play for s in speeches[:1]] == ["Coriolanus"]
    counts = Counter(s.play for s in speeches)
    assert list(counts) == [title for title, _, _ in PLAYS]  # contiguous, in file order
    assert counts == {
        "Coriolanus": 1100,
        "King Richard III": 1070,
        "King Richard II": 551,
        "Romeo and Juliet": 827,
        "King Henry VI, Part 3": 786,
        "The Winter's Tale": 735,
        "Measure for Measure": 872,
        "The Taming of the Shrew": 877,
        "The Tempest": 279,
    }
    # each play's most frequent speaker speaks in that play only (the boundaries follow the
    # casts), except Richard of Gloucester, who leads Richard III and is in Henry VI, Part 3
    for title, _, _ in PLAYS:
        lead = Counter(s.speaker for s in speeches if s.play == title).most_common(1)[0][0]
        plays = {s.play for s in speeches if s.speaker == lead}
        if lead == "GLOUCESTER":
            assert plays == {title, "King Henry VI, Part 3"}
        else:
            assert plays == {title}, lead


def test_splits_are_disjoint_by_play_and_cast() -> None:
    speeches = play_speeches()
    cast = {
        split: {s.speaker for s in speeches if split_of_play(s.play) == split} for split in SPLITS
    }
    # the test play (Richard II) shares only stock roles and titles with the training plays
    assert cast["train"] & cast["test"] == {
        "All",
        "DUCHESS OF YORK",
        "Lord",
        "NORTHUMBERLAND",
        "Servant",
    }
    assert not cast["train"] & cast["valid"]
    assert not cast["valid"] & cast["test"]
    for name in (PIG_LATIN_TASK, SPEAKERS_TASK):
        plays = {split: {r["play"] for r in task_rows(name, split)} for split in SPLITS}
        assert plays["valid"] == {"The Tempest"}
        assert plays["test"] == {"King Richard II"}
        assert len(plays["train"]) == 7
        assert not plays["train"] & (plays["valid"] | plays["test"])


def test_pig_latin_rows_exact() -> None:
    sizes = {split: len(task_rows(PIG_LATIN_TASK, split)) for split in SPLITS}
    assert sizes == {"train": 21892, "valid": 870, "test": 2793}
    assert task_rows(PIG_LATIN_TASK, "test")[:2] == [
        {
            "source": "Old John of Gaunt, time-honour'd Lancaster,",
            "target": "Oldway Ohnjay ofway Auntgay, imetay-onourhay'day Ancasterlay,",
            "play": "King Richard II",
        },
        {
            "source": "Hast thou, according to thy oath and band,",
            "target": "Asthay outhay, accordingway otay ythay oathway andway andbay,",
            "play": "King Richard II",
        },
    ]
    assert task_rows(PIG_LATIN_TASK, "valid")[0]["target"] == "Oatswainbay!"


def test_speaker_rows_exact() -> None:
    sizes = {split: len(task_rows(SPEAKERS_TASK, split)) for split in SPLITS}
    assert sizes == {"train": 986, "valid": 53, "test": 49}
    assert task_rows(SPEAKERS_TASK, "train")[0] == {
        "source": "First Citizen: Before we proceed any further, hear me speak. All: Speak, "
        "speak. First Citizen: You are all resolved rather to die than to famish?",
        "target": "First Citizen; All; First Citizen",
        "play": "Coriolanus",
    }
    assert task_rows(SPEAKERS_TASK, "test")[1]["target"] == (
        "HENRY BOLINGBROKE; JOHN OF GAUNT; HENRY BOLINGBROKE"
    )
    for row in task_rows(SPEAKERS_TASK, "train"):
        assert len(row["source"]) <= st.MAX_PASSAGE_CHARS
        speakers = row["target"].split("; ")
        assert len(speakers) == st.PASSAGE_SPEECHES
        assert row["source"].startswith(speakers[0] + ": ")


def test_rows_are_deterministic_copies(tmp_path) -> None:
    first = task_rows(SPEAKERS_TASK, "valid")
    first[0]["target"] = "changed"  # the caller's copy, not the cache
    again = task_rows(SPEAKERS_TASK, "valid")
    assert again[0]["target"] != "changed"
    n = write_task_jsonl(PIG_LATIN_TASK, "valid", tmp_path / "v.jsonl")
    lines = (tmp_path / "v.jsonl").read_text(encoding="utf-8").splitlines()
    assert n == len(lines) == 870
    assert json.loads(lines[0]) == task_rows(PIG_LATIN_TASK, "valid")[0]


def test_unknown_names_are_refused() -> None:
    with pytest.raises(LmarchError, match="unknown bundled task 'shakespeare-qa'"):
        task_rows("shakespeare-qa")
    with pytest.raises(LmarchError, match="unknown split 'dev'"):
        task_rows(PIG_LATIN_TASK, "dev")


def test_a_changed_corpus_is_refused(monkeypatch, tmp_path) -> None:
    damaged = tmp_path / "tiny.txt"
    damaged.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    monkeypatch.setattr(st, "TINY_SHAKESPEARE", damaged)
    play_speeches.cache_clear()
    try:
        with pytest.raises(LmarchError, match="the opening of King Richard III"):
            play_speeches()
    finally:
        play_speeches.cache_clear()


def test_names_work_as_seq2seq_data_of_lmarch_train() -> None:
    from lmarch.data.seq2seq import Seq2SeqPair
    from lmarch.train.run import read_run_data

    pairs = st.task_pairs(SPEAKERS_TASK, "valid")
    first = task_rows(SPEAKERS_TASK, "valid")[0]
    assert pairs[0] == Seq2SeqPair(first["source"], first["target"], 1)
    train_text, val_text, train, val = read_run_data(SPEAKERS_TASK, "seq2seq", 0.1)
    assert (len(train), len(val)) == (986, 53)  # the train plays, the valid play
    assert val == pairs
    assert val_text.splitlines()[:2] == [first["source"], first["target"]]
