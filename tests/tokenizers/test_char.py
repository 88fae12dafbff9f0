"""CharTokenizer: vocabulary, round trips, errors and its saved file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.errors import LmarchError
from lmarch.tokenizers import CharTokenizer, Tokenizer, load_tokenizer


def test_vocabulary_is_sorted_set_of_characters() -> None:
    tok = CharTokenizer.from_text("hello, world")
    assert tok.chars == [" ", ",", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 9
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.decode([8, 6, 7, 5, 2]) == "world"
    assert isinstance(tok, Tokenizer)


def test_round_trip_on_tiny_shakespeare() -> None:
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65  # the figure every char-level Shakespeare run quotes
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert max(ids) == tok.vocab_size - 1 and min(ids) == 0


def test_round_trip_on_unicode() -> None:
    text = "naïve café — 東京 🙂\u0301\t\n\x00"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text[::-1])) == text[::-1]


def test_unknown_character_names_it() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(LmarchError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")


def test_decode_rejects_out_of_range_ids() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(LmarchError, match="token id 3 is not in 0..2"):
        tok.decode([0, 3])
    with pytest.raises(LmarchError, match="token id -1"):
        tok.decode([-1])


def test_save_load_round_trip(tmp_path: Path) -> None:
    tok = CharTokenizer.from_text("To be, or not to be: 東京 🙂")
    path = tmp_path / "char.json"
    tok.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"type": "char", "chars": tok.chars}
    for loaded in (CharTokenizer.load(path), load_tokenizer(path)):
        assert isinstance(loaded, CharTokenizer)
        assert loaded.chars == tok.chars
        assert loaded.encode("not to be 🙂") == tok.encode("not to be 🙂")


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"type": "byte_bpe", "chars": ["a"]}',
        '{"type": "char", "chars": "abc"}',
        '{"type": "char", "chars": ["a", "bc"]}',
        '{"type": "char", "chars": ["a", "a"]}',
    ],
)
def test_malformed_file_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LmarchError, match="broken.json"):
        CharTokenizer.load(path)
