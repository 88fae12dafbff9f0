"""Model input for a bidirectional encoder: special tokens around one or two segments, the
segments cut to fit, and a batch padded to one width.

BERT (Devlin et al. 2019) reads ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` with token type
0 up to the first separator and 1 after it. RoBERTa (Liu et al. 2019) keeps the shape with its own
tokens and one token type, and doubles the separator between segments:
``<s> A </s> </s> B </s>``. :class:`EncoderInputMixin` builds either from a tokenizer's plain
``encode`` and its ``cls_id`` / ``sep_id`` / ``pad_id``; the two class attributes say which shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmarch.errors import LmarchError


def truncate_longest_first(
    first: list[int], second: list[int] | None, room: int
) -> tuple[list[int], list[int] | None]:
    """Cut one or two segments at their ends so that together they hold at most ``room`` ids.

    As the ``tokenizers`` library does ("longest first"): when a pair does not fit, the shorter
    segment is kept whole if the longer one can take the rest, otherwise both get half the room
    (the longer one, or the first if they are equal, one more).
    """
    if second is None:
        return first[:room], None
    if len(first) + len(second) <= room:
        return first, second
    n1, n2 = len(first), len(second)
    short, long = min(n1, n2), max(n1, n2)
    long = max(short, room - short) if short <= room else short
    if short + long > room:
        short, long = room // 2, room // 2 + room % 2
    keep1, keep2 = (long, short) if n1 > n2 else (short, long)
    return first[:keep1], second[:keep2]


def pad_encoder_rows(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int | None
) -> dict[str, list[list[int]]]:
    """Right-pad ``(input ids, token type ids)`` rows to the longest one.

    Returns ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (1 for tokens, 0 for
    padding) and ``token_type_ids`` (0 on padding), each a list of equally long rows.
    """
    width = max((len(ids) for ids, _ in rows), default=0)
    if pad_id is None and any(len(ids) < width for ids, _ in rows):
        raise LmarchError("this vocabulary has no padding token to pad the batch with")
    batch: dict[str, list[list[int]]] = {
        "input_ids": [],
        "attention_mask": [],
        "token_type_ids": [],
    }
    for ids, types in rows:
        fill = width - len(ids)
        batch["input_ids"].append(list(ids) + [pad_id] * fill)  # type: ignore[list-item]
        batch["attention_mask"].append([1] * len(ids) + [0] * fill)
        batch["token_type_ids"].append(list(types) + [0] * fill)
    return batch


class EncoderInputMixin:
    """``encode_pair`` and ``encode_batch`` for a tokenizer whose ``encode`` adds no special
    tokens and which has ``cls_id``, ``sep_id`` and ``pad_id`` (``None`` where missing).

    ``pair_separators`` is how many separators stand between two segments (BERT 1, RoBERTa 2);
    ``second_segment_type`` is the token type of the second segment (BERT 1, RoBERTa 0).
    """

    pair_separators: int = 1
    second_segment_type: int = 1

    cls_id: int | None
    sep_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]:  # pragma: no cover - provided by the tokenizer
        raise NotImplementedError

    def encode_pair(
        self, text: str, pair: str | None = None, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """The model input for one segment or a pair: ``(input ids, token type ids)``.

        ``CLS A SEP`` or ``CLS A SEP [SEP] B SEP`` (the bracketed separator for RoBERTa only),
        type 0 up to and including the first segment's separators and ``second_segment_type``
        after them. With ``max_length`` (counting the special tokens) the segments are cut by
        :func:`truncate_longest_first`.
        """
        cls, sep = self.cls_id, self.sep_id
        if cls is None or sep is None:
            raise LmarchError("this vocabulary has no CLS/SEP tokens to build model input from")
        first = self.encode(text)
        second = None if pair is None else self.encode(pair)
        if max_length is not None:
            specials = 2 if second is None else 2 + self.pair_separators
            room = max_length - specials
            if room < 0:
                raise LmarchError(f"max_length {max_length} leaves no room besides CLS/SEP")
            first, second = truncate_longest_first(first, second, room)
        ids = [cls, *first, sep]
        types = [0] * len(ids)
        if second is not None:
            extra = [sep] * (self.pair_separators - 1)
            ids += [*extra, *second, sep]
            types += [0] * len(extra) + [self.second_segment_type] * (len(second) + 1)
        return ids, types

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        pairs: Sequence[str] | None = None,
    ) -> dict[str, list[list[int]]]:
        """:meth:`encode_pair` for each text (with ``pairs[i]`` as its second segment, if given),
        padded by :func:`pad_encoder_rows` with ``pad_id``."""
        if pairs is not None and len(pairs) != len(texts):
            raise LmarchError(f"{len(texts)} texts but {len(pairs)} pairs")
        rows = [
            self.encode_pair(text, None if pairs is None else pairs[i], max_length)
            for i, text in enumerate(texts)
        ]
        return pad_encoder_rows(rows, self.pad_id)


__all__ = ["EncoderInputMixin", "pad_encoder_rows", "truncate_longest_first"]
