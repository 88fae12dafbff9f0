"""shakespeare-qa: exact examples, a split by play, answers at their offsets and the speaker's
own header, the baselines; SQuAD-layout JSONL rows read, split and refused line by line."""

from __future__ import annotations

import json

import pytest

from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.data.shakespeare_qa import (
    SPLITS,
    QAExample,
    first_speaker_baseline,
    frequent_speaker_baseline,
    load_qa_data,
    parse_speeches,
    play_ranges,
    read_qa_jsonl,
    shakespeare_qa,
    split_qa_examples,
)
from lmarch.errors import LmarchError


@pytest.fixture(scope="module")
def data():
    return shakespeare_qa()


def test_plays_are_found_at_their_first_speech() -> None:
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    speeches = parse_speeches(text)
    assert len(speeches) == 7222
    assert play_ranges(text, speeches) == [
        ("Coriolanus", "train", 0, 1107),
        ("King Richard III", "train", 1107, 2196),
        ("King Richard II", "train", 2196, 2750),
        ("Romeo and Juliet", "train", 2750, 3590),
        ("King Henry VI, Part 3", "train", 3590, 4403),
        ("The Winter's Tale", "train", 4403, 5149),
        ("Measure for Measure", "validation", 5149, 6046),
        ("The Taming of the Shrew", "test", 6046, 6939),
        ("The Tempest", "test", 6939, 7222),
    ]


def test_exact_examples(data) -> None:
    """Sizes and the first and last question of each split (the default: passages of two
    speeches, each speech's first line of three words or more quoted)."""
    assert (len(data.train), len(data.validation), len(data.test)) == (4888, 839, 1108)
    first = data.train[0]
    assert first.id == "coriolanus-0000-0"
    assert first.question == "Who says: Before we proceed any further, hear me speak.?"
    assert (first.answers, first.answer_starts) == (("First Citizen",), (0,))
    assert first.context == (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
    )
    assert first.group == "Coriolanus"
    last = data.train[-1]
    assert (last.id, last.question, last.answers, last.answer_starts) == (
        "the-winter-s-tale-0372-1",
        "Who says: O, peace, Paulina!?",
        ("LEONTES",),
        (318,),
    )
    val = data.validation[0]  # the first passage's speeches ("Escalus." / "My lord.") are too short
    assert (val.id, val.question, val.answers, val.answer_starts) == (
        "measure-for-measure-0001-0",
        "Who says: Of government the properties to unfold,?",
        ("DUKE VINCENTIO",),
        (0,),
    )
    test = data.test[1]
    assert (
        test.context == "SLY:\nI'll pheeze you, in faith.\n\nHostess:\nA pair of stocks, you rogue!"
    )
    assert (test.question, test.answers, test.answer_starts) == (
        "Who says: A pair of stocks, you rogue!?",
        ("Hostess",),
        (33,),
    )
    assert data.test[-1].id == "the-tempest-0140-1"


def test_the_harder_variant_quotes_any_line_of_longer_passages() -> None:
    """``speeches_per_passage=4, line="any"``: four speeches, a line picked by hash (the task
    as first bundled, kept as an option)."""
    data = shakespeare_qa(speeches_per_passage=4, line="any")
    assert (len(data.train), len(data.validation), len(data.test)) == (4878, 837, 1106)
    last = data.train[-1]
    assert (last.id, last.question, last.answers, last.answer_starts) == (
        "the-winter-s-tale-0185-3",
        "Who says: And from your sacred vials pour your graces?",
        ("HERMIONE",),
        (442,),
    )
    test = data.test[1]
    assert test.context.startswith("SLY:\nI'll pheeze you, in faith.\n\nHostess:\n")
    assert (test.question, test.answers, test.answer_starts) == (
        "Who says: A pair of stocks, you rogue!?",
        ("Hostess",),
        (33,),
    )
    with pytest.raises(LmarchError, match="unknown question line 'last'"):
        shakespeare_qa(line="last")


def test_every_answer_is_the_header_of_the_speech_holding_the_line(data) -> None:
    for split in SPLITS:
        for ex in data.split(split):
            start, name = ex.answer_starts[0], ex.answers[0]
            assert ex.context[start : start + len(name) + 2] == name + ":\n"
            line = ex.question[len("Who says: ") : -1]
            at = ex.context.index(line)
            assert ex.context.count(line) == 1 and at > start
            assert "\n\n" not in ex.context[start:at]  # no other speech in between
            assert len(parse_speeches(ex.context)) == 2


def test_split_by_play_and_deterministic(data) -> None:
    plays = {split: {ex.group for ex in data.split(split)} for split in SPLITS}
    assert plays["validation"] == {"Measure for Measure"}
    assert plays["test"] == {"The Taming of the Shrew", "The Tempest"}
    assert len(plays["train"]) == 6
    contexts = {split: {ex.context for ex in data.split(split)} for split in SPLITS}
    assert not contexts["train"] & contexts["test"]
    assert shakespeare_qa() == data
    assert len(shakespeare_qa(speeches_per_passage=1).test) > len(data.test)
    with pytest.raises(LmarchError, match="speeches_per_passage"):
        shakespeare_qa(speeches_per_passage=0)


def test_baselines() -> None:
    context = (
        "ANNE:\nNo.\n\nGLOUCESTER:\nYes: quite so.\nBut hear:\n\nGLOUCESTER:\nAy.\n\nANNE:\nO!"
    )
    ex = QAExample("x", context, "Who says: Ay.?", ("GLOUCESTER",), (39,))
    assert [s.name for s in parse_speeches(context)] == ["ANNE", "GLOUCESTER", "GLOUCESTER", "ANNE"]
    assert first_speaker_baseline(ex) == "ANNE"
    assert frequent_speaker_baseline(ex) == "ANNE"  # a 2-2 tie goes to who speaks first
    ex2 = QAExample("y", context + "\n\nGLOUCESTER:\nGo.", "q", ("ANNE",), (0,))
    assert frequent_speaker_baseline(ex2) == "GLOUCESTER"
    assert first_speaker_baseline(QAExample("z", "no headers here", "q", ("no",), (0,))) == ""


def test_parse_speeches_keeps_colon_lines_and_empty_speeches() -> None:
    text = "SAMPSON:\n\nGREGORY:\nHear me:\nNo.\n\nABRAHAM:\nYou lie."
    speeches = parse_speeches(text)
    assert [(s.name, s.lines) for s in speeches] == [
        ("SAMPSON", ()),
        ("GREGORY", ("Hear me:", "No.")),
        ("ABRAHAM", ("You lie.",)),
    ]
    assert [text[s.start : s.end] for s in speeches] == [
        "SAMPSON:",
        "GREGORY:\nHear me:\nNo.",
        "ABRAHAM:\nYou lie.",
    ]


# --- JSONL --------------------------------------------------------------------------------------


def _row(
    context="The Duke of York is here.", question="Who is here?", text="Duke of York", start=4
):
    return {
        "context": context,
        "question": question,
        "answers": {"text": [text], "answer_start": [start]},
    }


def test_jsonl_rows_read_and_split(tmp_path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [_row(context=f"Ctx {i}: the Duke of York.", start=11) for i in range(10)]
    rows[3]["id"] = "mine"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = read_qa_jsonl(path)
    assert len(examples) == 10 and examples[3].id == "mine" and examples[0].id == "qa.jsonl:1"
    assert examples[0].answers == ("Duke of York",) and examples[0].answer_starts == (11,)
    train, test = split_qa_examples(examples, 0.2, seed=0)
    assert len(test) == 2 and not {e.context for e in train} & {e.context for e in test}
    assert split_qa_examples(examples, 0.2, seed=0) == (train, test)
    data = load_qa_data(str(path))
    assert data.test == test and data.validation == test
    (tmp_path / "qa.test.jsonl").write_text(json.dumps(_row()) + "\n")
    data = load_qa_data(str(path))
    assert len(data.train) == 10 and [e.context for e in data.test] == ["The Duke of York is here."]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ('{"question": "q", "answers": {"text": ["a"], "answer_start": [0]}}', '"context"'),
        ('{"context": "a b", "answers": {"text": ["a"], "answer_start": [0]}}', '"question"'),
        ('{"context": "a b", "question": "q"}', 'no "answers" object'),
        ('{"context": "a b", "question": "q", "answers": {"text": ["a"]}}', "lists"),
        (
            '{"context": "a b", "question": "q", "answers": {"text": ["a", "b"], "answer_start": [0]}}',
            "2 texts but 1 answer_start",
        ),
        (
            '{"context": "The Duke", "question": "q", "answers": {"text": ["Duke"], "answer_start": [3]}}',
            "the context holds ' Duk' at 3, not the answer 'Duke'",
        ),
        (
            '{"context": "a b", "question": "q", "answers": {"text": ["b"], "answer_start": [7]}}',
            "answer_start 7 of 'b' is not a place in the context",
        ),
        (
            '{"context": "a b", "question": "q", "answers": {"text": [""], "answer_start": [0]}}',
            "empty",
        ),
        ("[1, 2]", "not a JSON object"),
        ("{bad json", "not valid JSON"),
    ],
)
def test_bad_rows_are_refused_naming_the_line(tmp_path, row: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + row + "\n")
    with pytest.raises(LmarchError) as info:
        read_qa_jsonl(path)
    assert f"{path}, line 2: " in str(info.value) and needle in str(info.value)


def test_missing_and_empty_files_are_refused(tmp_path) -> None:
    with pytest.raises(LmarchError, match="data file not found"):
        read_qa_jsonl(tmp_path / "none.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LmarchError, match="holds no examples"):
        read_qa_jsonl(empty)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(_row()) + "\n")
    with pytest.raises(LmarchError, match="too small to hold out a test set"):
        load_qa_data(str(one))
