"""The whole-list construction of GGUF vocabularies (lmarch.tokenizers.gguf_vocab / bpe) gives
exactly the tables of the one-by-one loops it replaced, and still names the first bad entry."""

from __future__ import annotations

import pytest

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import _merge_table, bytes_to_unicode
from lmarch.tokenizers.gguf_vocab import _merge_pairs, _token_tables

BYTE_CHAR = bytes_to_unicode()


def loop_pairs(lines: list[str]) -> list[tuple[str, str]]:
    """The reference: one line at a time."""
    out = []
    for line in lines:
        parts = line.split(" ")
        assert len(parts) == 2 and all(parts)
        out.append((parts[0], parts[1]))
    return out


@pytest.mark.parametrize(
    "lines",
    [
        ["a b", "ab c", "Ġ t", "Ġt he"],
        ["a b\nc", "d e"],  # a newline inside a token: the bulk split must not be fooled
        ["a\nb c"],
        [],
    ],
)
def test_merge_pairs_equal_the_line_loop(lines: list[str]) -> None:
    assert _merge_pairs(lines) == loop_pairs(lines)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["a b", "c d e", "f g"], "merge 1 'c d e' is not two tokens"),
        (["a b", "cd", "e f g"], "merge 1 'cd' is not two tokens"),  # same total of spaces
        (["a b", " c"], "merge 1 ' c' is not two tokens"),
    ],
)
def test_merge_pairs_name_the_first_bad_line(lines: list[str], message: str) -> None:
    with pytest.raises(LmarchError, match=message):
        _merge_pairs(lines)


def test_merge_table_ranks_and_refusals() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}
    table, pairs = _merge_table(vocab, [("a", "b"), ("ab", "c")])
    assert table == {(0, 1): (0, 3), (3, 2): (1, 4)} and pairs == [("a", "b"), ("ab", "c")]
    with pytest.raises(LmarchError, match=r"merge 2 \(a b\) appears twice"):
        _merge_table(vocab, [("a", "b"), ("ab", "c"), ("a", "b")])
    with pytest.raises(LmarchError, match=r"merge 1 \(b c\) uses 'bc', not in vocab"):
        _merge_table(vocab, [("a", "b"), ("b", "c")])


def test_token_tables_equal_the_token_loop() -> None:
    tokens = [BYTE_CHAR[b] for b in range(256)] + ["ab", "<ctl>", "<user>", "x y"]
    types = [1] * 257 + [3, 4, 1]  # "x y": a normal token outside the byte alphabet
    vocab, special, added = _token_tables(tokens, types)
    assert special == {"<ctl>": 257} and added == {"<user>": 258}
    assert vocab["xĠy"] == 259 and list(vocab.values()) == [*range(257), 259]
    # all in the alphabet: the bulk path, same tables and id order
    vocab, special, added = _token_tables(tokens[:-1], types[:-1])
    assert list(vocab.items()) == [(t, i) for i, t in enumerate(tokens[:257])]
    assert special == {"<ctl>": 257} and added == {"<user>": 258}
    with pytest.raises(LmarchError, match=r"token 'ab' appears twice \(ids 256 and 259\)"):
        _token_tables([*tokens[:-1], "ab"], types)
