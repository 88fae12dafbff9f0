"""Sequence-to-sequence data: ``{"source": ..., "target": ...}`` JSONL rows to padded batches.

An encoder-decoder is trained on batches ``(input_ids, attention_mask, decoder_input_ids,
labels)`` (what :class:`lmarch.models.transformer.Seq2SeqLoss` reads):

    input_ids          [B, S]  [bos] source [eos], right-padded with pad_id
    attention_mask     [B, S]  1 at real source tokens, 0 at padding
    labels             [B, T]  [bos] target [eos], -100 at padding (the loss skips it)
    decoder_input_ids  [B, T]  labels shifted right: [start, y_1 .. y_{T-1}] (teacher forcing)

``bos`` is put first only where a model has one distinct from its decoder start (BART's
``<s>``; T5 has none, the original Transformer starts decoding with it). The API, as the
tasks use it:

- :func:`read_pairs` reads a JSONL file into :class:`Seq2SeqPair` rows; an empty row, a row
  that is not a JSON object, or one without a non-empty string ``source`` / ``target`` is one
  :class:`~lmarch.errors.LmarchError` naming the file and line.
- :class:`Seq2SeqSpecials` holds the ids above; :meth:`Seq2SeqSpecials.of` reads them from a
  model config (T5, Transformer, BART / Marian).
- :func:`encode_pair` / :func:`encode_pairs` tokenize rows into ``(source_ids, target_ids)``,
  cutting what exceeds ``max_source`` / ``max_target`` (the end token kept) or, with
  ``truncate=False``, refusing it by line.
- :func:`collate_seq2seq` pads a list of ``(source_ids, target_ids)`` into the batch above.
- :class:`Seq2SeqBatches` draws random batches for the Trainer (``sample``, ``state_dict``),
  optionally turning each example into a pair on the fly (the noising objectives of
  :mod:`lmarch.data.noising` do).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmarch.data.masking import IGNORE_INDEX, pad_sequences
from lmarch.errors import LmarchError

Pair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Seq2SeqPair:
    """One row: the source text, the target text and the 1-based line it came from."""

    source: str
    target: str
    line: int = 0


def _row_error(path: Path, line: int, problem: str) -> LmarchError:
    return LmarchError(
        f"{path}:{line}: {problem}",
        hint='each line must be a JSON object {"source": "...", "target": "..."}',
    )


def read_pairs(path: str | Path) -> list[Seq2SeqPair]:
    """The rows of a JSONL file of ``{"source": str, "target": str}`` objects (other keys are
    ignored). Trailing blank lines are allowed; a blank line before the last row, bad JSON,
    a missing, non-string or empty ``source`` / ``target`` is refused naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmarchError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from None
    lines = text.rstrip().splitlines()
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise _row_error(path, number, "empty row")
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise _row_error(path, number, f"not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise _row_error(path, number, f"a row must be a JSON object, got {type(row).__name__}")
        for key in ("source", "target"):
            value = row.get(key)
            if value is None:
                raise _row_error(path, number, f'row without "{key}"')
            if not isinstance(value, str):
                raise _row_error(path, number, f'"{key}" must be a string')
            if not value.strip():
                raise _row_error(path, number, f'empty "{key}"')
        pairs.append(Seq2SeqPair(row["source"], row["target"], number))
    if not pairs:
        raise LmarchError(f"{path} holds no rows", hint='one {"source", "target"} object a line')
    return pairs


def split_pairs(
    pairs: Sequence[Seq2SeqPair], val_fraction: float
) -> tuple[list[Seq2SeqPair], list[Seq2SeqPair]]:
    """The last ``ceil(n * val_fraction)`` rows (at least one) for validation, the rest for
    training; at least two rows are needed."""
    if len(pairs) < 2:
        raise LmarchError(
            f"{len(pairs)} row is too few to split into training and validation",
            hint="give at least two rows",
        )
    n_val = min(len(pairs) - 1, max(1, math.ceil(len(pairs) * val_fraction - 1e-9)))
    return list(pairs[:-n_val]), list(pairs[-n_val:])


@dataclass(frozen=True)
class Seq2SeqSpecials:
    """The token ids a seq2seq batch is built with (module docstring)."""

    pad_id: int
    eos_id: int
    decoder_start_id: int
    bos_id: int | None = None

    @classmethod
    def of(cls, config: Any) -> Seq2SeqSpecials:
        """The ids of an encoder-decoder config (``pad_token_id``, ``eos_token_id``,
        ``decoder_start_token_id``, and ``bos_token_id`` where it exists and differs from the
        decoder start)."""
        start = int(config.decoder_start_token_id)
        bos = getattr(config, "bos_token_id", None)
        return cls(
            int(config.pad_token_id),
            int(config.eos_token_id),
            start,
            None if bos is None or int(bos) == start else int(bos),
        )

    def wrap(self, ids: Sequence[int]) -> list[int]:
        """``[bos] ids [eos]``."""
        head = [] if self.bos_id is None else [self.bos_id]
        return [*head, *ids, self.eos_id]


def _fit(ids: list[int], limit: int, specials: Seq2SeqSpecials) -> list[int] | None:
    """``specials.wrap(ids)`` cut to ``limit`` tokens (end token kept), None if it fits."""
    wrapped = specials.wrap(ids)
    if len(wrapped) <= limit:
        return None
    return [*wrapped[: limit - 1], specials.eos_id]


def encode_pair(
    tokenizer: Any,
    pair: Seq2SeqPair,
    specials: Seq2SeqSpecials,
    max_source: int,
    max_target: int,
    truncate: bool = True,
) -> tuple[Pair, bool]:
    """``((source_ids, target_ids), was_cut)`` for one row: each side wrapped in its specials,
    cut to its limit (``truncate``) or refused with the row's line (``truncate=False``)."""
    sides = []
    cut = False
    for what, text, limit in (
        ("source", pair.source, max_source),
        ("target", pair.target, max_target),
    ):
        ids = tokenizer.encode(text)
        shorter = _fit(ids, limit, specials)
        if shorter is not None:
            if not truncate:
                raise LmarchError(
                    f"line {pair.line}: the {what} has {len(specials.wrap(ids))} tokens, more than "
                    f"the model's {limit}",
                    hint="shorten it, or allow truncation",
                )
            cut = True
        sides.append(specials.wrap(ids) if shorter is None else shorter)
    return (sides[0], sides[1]), cut


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[Seq2SeqPair],
    specials: Seq2SeqSpecials,
    max_source: int,
    max_target: int,
    truncate: bool = True,
) -> tuple[list[Pair], int]:
    """Every row through :func:`encode_pair`: ``(pairs of ids, how many rows were cut)``."""
    out, cut = [], 0
    for pair in pairs:
        ids, was_cut = encode_pair(tokenizer, pair, specials, max_source, max_target, truncate)
        out.append(ids)
        cut += was_cut
    return out, cut


def shift_right(labels: Tensor, decoder_start_id: int, pad_id: int) -> Tensor:
    """Decoder inputs ``[start, y_1 .. y_{T-1}]`` from labels [B, T]; ignored labels (-100)
    read as padding."""
    shifted = labels.new_full(labels.shape, decoder_start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


def collate_seq2seq(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, decoder_start_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, decoder_input_ids, labels)`` for ``(source, target)`` id
    lists (already wrapped in their specials): sources padded with ``pad_id``, labels with
    -100, decoder inputs the labels shifted right after ``decoder_start_id``."""
    if not pairs:
        raise ValueError("no pairs to collate")
    input_ids, attention_mask = pad_sequences([s for s, _ in pairs], pad_id)
    labels, _ = pad_sequences([t for _, t in pairs], IGNORE_INDEX)
    return input_ids, attention_mask, shift_right(labels, decoder_start_id, pad_id), labels


class Seq2SeqBatches:
    """Random batches of ``examples`` for the Trainer (the interface of
    :class:`lmarch.data.batches.RandomBlockSampler`: ``sample``, ``generator``,
    ``batch_size``, ``block_size``, ``state_dict``).

    Each drawn example becomes a ``(source_ids, target_ids)`` pair through
    ``make_pair(example, generator)``; without ``make_pair`` the examples are such pairs
    already. ``block_size`` (default: the longest source seen at construction, or the
    examples' longest) only sizes the Trainer's tokens-per-second count.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        specials: Seq2SeqSpecials,
        make_pair: Callable[[Any, torch.Generator], Pair] | None = None,
        seed: int = 0,
        block_size: int | None = None,
    ) -> None:
        if not examples:
            raise LmarchError("no examples to draw sequence-to-sequence batches from")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.specials = specials
        self.make_pair = make_pair
        self.generator = torch.Generator().manual_seed(seed)
        if block_size is None:
            block_size = max(len(e[0]) if make_pair is None else len(e) for e in self.examples)
        self.block_size = block_size

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """One batch drawn from ``generator`` (default: the sampler's own)."""
        g = generator or self.generator
        rows = torch.randint(len(self.examples), (self.batch_size,), generator=g).tolist()
        chosen = [self.examples[r] for r in rows]
        if self.make_pair is not None:
            chosen = [self.make_pair(e, g) for e in chosen]
        return collate_seq2seq(chosen, self.specials.pad_id, self.specials.decoder_start_id)

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state: where this sampler is in its random order."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from a saved position."""
        self.generator.set_state(state["generator"])


__all__ = [
    "Seq2SeqBatches",
    "Seq2SeqPair",
    "Seq2SeqSpecials",
    "collate_seq2seq",
    "encode_pair",
    "encode_pairs",
    "read_pairs",
    "shift_right",
    "split_pairs",
]
