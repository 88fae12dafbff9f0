"""Seq2seq rows: reading JSONL (bad rows refused by line), encoding with specials and
truncation, and the padded batch the encoder-decoder loss reads."""

from __future__ import annotations

import json

import pytest
import torch

from lmarch.data.masking import IGNORE_INDEX
from lmarch.data.seq2seq import (
    Seq2SeqBatches,
    Seq2SeqPair,
    Seq2SeqSpecials,
    collate_seq2seq,
    encode_pair,
    encode_pairs,
    read_pairs,
    split_pairs,
)
from lmarch.errors import LmarchError
from lmarch.models.bart import BartConfig
from lmarch.models.t5 import T5Config
from lmarch.models.transformer import TransformerConfig, shift_right


class _Letters:
    """A tokenizer with one id per lower-case letter (a=10, b=11, ...)."""

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) - ord("a") for c in text if c.isalpha()]


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_pairs_keeps_rows_and_their_lines(tmp_path) -> None:
    rows = [{"source": "ab", "target": "c", "id": 7}, {"source": "d", "target": "ef"}]
    path = _write(tmp_path, [json.dumps(r) for r in rows] + ["", ""])
    assert read_pairs(path) == [Seq2SeqPair("ab", "c", 1), Seq2SeqPair("d", "ef", 2)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"source": "a", "target": "b"}', "", '{"source": "a", "target": "b"}'], ":2: empty row"),
        (['{"source": "a"}'], ':1: row without "target"'),
        (['{"source": "a", "target": "b"}', '{"target": "b"}'], ':2: row without "source"'),
        (['{"source": "a", "target": "  "}'], ':1: empty "target"'),
        (['{"source": "a", "target": 3}'], ':1: "target" must be a string'),
        (['["a", "b"]'], ":1: a row must be a JSON object, got list"),
        (['{"source": "a", '], ":1: not valid JSON"),
    ],
)
def test_bad_rows_are_refused_naming_the_line(tmp_path, lines, message) -> None:
    path = _write(tmp_path, lines)
    with pytest.raises(LmarchError) as info:
        read_pairs(path)
    assert str(info.value).startswith(f"{path}{message}")


def test_missing_and_empty_files_are_refused(tmp_path) -> None:
    with pytest.raises(LmarchError, match="data file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(LmarchError, match="holds no rows"):
        read_pairs(_write(tmp_path, [""]))


def test_split_keeps_the_last_rows_for_validation() -> None:
    pairs = [Seq2SeqPair(str(i), str(i), i) for i in range(1, 11)]
    train, val = split_pairs(pairs, 0.1)
    assert [p.line for p in val] == [10] and len(train) == 9
    assert [p.line for p in split_pairs(pairs, 0.25)[1]] == [8, 9, 10]
    with pytest.raises(LmarchError, match="too few"):
        split_pairs(pairs[:1], 0.1)


def test_specials_follow_each_family() -> None:
    """T5: no bos, start = pad; BART: <s> first, start = </s>; the Transformer starts with
    its bos, so it is not repeated in the labels."""
    assert Seq2SeqSpecials.of(T5Config()) == Seq2SeqSpecials(0, 1, 0, None)
    assert Seq2SeqSpecials.of(BartConfig()) == Seq2SeqSpecials(1, 2, 2, 0)
    assert Seq2SeqSpecials.of(TransformerConfig()) == Seq2SeqSpecials(0, 2, 1, None)


def test_encode_wraps_and_cuts_keeping_the_end_token() -> None:
    bart = Seq2SeqSpecials(pad_id=1, eos_id=2, decoder_start_id=2, bos_id=0)
    ids, cut = encode_pair(_Letters(), Seq2SeqPair("abc", "d", 4), bart, 10, 10)
    assert ids == ([0, 10, 11, 12, 2], [0, 13, 2]) and not cut
    ids, cut = encode_pair(_Letters(), Seq2SeqPair("abcdef", "d", 4), bart, 5, 10)
    assert ids == ([0, 10, 11, 12, 2], [0, 13, 2]) and cut
    with pytest.raises(
        LmarchError, match="line 4: the source has 8 tokens, more than the model's 5"
    ):
        encode_pair(_Letters(), Seq2SeqPair("abcdef", "d", 4), bart, 5, 10, truncate=False)
    t5 = Seq2SeqSpecials(pad_id=0, eos_id=1, decoder_start_id=0)
    pairs, n_cut = encode_pairs(
        _Letters(), [Seq2SeqPair("ab", "c"), Seq2SeqPair("a", "bcdef")], t5, 8, 3
    )
    assert pairs == [([10, 11, 1], [12, 1]), ([10, 1], [11, 12, 1])] and n_cut == 1


def test_collate_pads_and_shifts_like_the_models() -> None:
    pairs = [([5, 6, 7, 1], [8, 1]), ([9, 1], [3, 4, 5, 1])]
    input_ids, mask, decoder_input_ids, labels = collate_seq2seq(
        pairs, pad_id=0, decoder_start_id=0
    )
    assert input_ids.tolist() == [[5, 6, 7, 1], [9, 1, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[8, 1, IGNORE_INDEX, IGNORE_INDEX], [3, 4, 5, 1]]
    assert decoder_input_ids.tolist() == [[0, 8, 1, 0], [0, 3, 4, 5]]
    assert torch.equal(decoder_input_ids, shift_right(labels, 0, 0))  # the model's own


def test_batches_are_reproducible_and_resumable() -> None:
    pairs = [([i, 1], [i + 1, 1]) for i in range(2, 40)]
    specials = Seq2SeqSpecials(0, 1, 0)
    a = Seq2SeqBatches(pairs, 4, specials, seed=3)
    b = Seq2SeqBatches(pairs, 4, specials, seed=3)
    a.sample()
    state = a.state_dict()
    first = a.sample()
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(first, b.sample(), strict=True))
    assert a.block_size == 2
    doubled = Seq2SeqBatches([[3, 4]] * 3, 2, specials, make_pair=lambda e, g: (e, e + e))
    assert doubled.sample()[3].tolist() == [[3, 4, 3, 4]] * 2
