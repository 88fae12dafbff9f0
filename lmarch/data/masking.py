"""Masked-language-model batches (Devlin et al. 2019, section 3.1, "Task #1: Masked LM").

Of the tokens that are not special ([CLS], [SEP], [PAD]), each is chosen for prediction with
probability p = 0.15. A chosen token is replaced by [MASK] 80% of the time, by a random
(non-special) token 10% of the time, and left as it is the remaining 10%; the model must
predict the original token at every chosen position. Labels hold the original id there and
-100 (ignored by ``cross_entropy``) elsewhere. The random and unchanged cases keep the model
from learning that only [MASK] positions matter, since [MASK] never appears at fine-tuning time.

Whole-word masking (the later BERT release, "wwm") chooses *words* with probability p and then
treats every WordPiece of a chosen word as chosen, so the model cannot fill in "##ing" from
"runn" next to it.

All randomness comes from a ``torch.Generator`` passed in, so batches are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class MaskingConfig:
    """The masking recipe; the defaults are BERT's."""

    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    whole_word: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"masking probability must lie in (0, 1), got {self.probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0:
            raise ValueError("mask_fraction and random_fraction must be >= 0")
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            raise ValueError("mask_fraction + random_fraction must be <= 1")


class MaskedLMCollator:
    """Applies BERT's 80/10/10 masking to a padded batch of token ids.

    ``special_ids`` are never chosen (nor are padded positions); random replacements are drawn
    uniformly from the ids in ``range(vocab_size)`` that are not special.
    """

    def __init__(
        self,
        mask_id: int,
        vocab_size: int,
        special_ids: Iterable[int],
        config: MaskingConfig | None = None,
    ) -> None:
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.special_ids = sorted({int(i) for i in special_ids} | {self.mask_id})
        self.config = config or MaskingConfig()
        is_special = torch.zeros(self.vocab_size, dtype=torch.bool)
        is_special[[i for i in self.special_ids if 0 <= i < self.vocab_size]] = True
        self._is_special = is_special
        self._candidates = torch.nonzero(~is_special).flatten()
        if len(self._candidates) == 0:
            raise ValueError("the vocabulary has no non-special tokens to sample from")

    def choose(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        word_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The boolean [B, T] mask of positions chosen for prediction.

        With ``config.whole_word`` and ``word_ids`` ([B, T], the word index of each token within
        its sequence, -1 for specials), a word is chosen with probability p and all its pieces
        with it; otherwise each maskable token is chosen independently with probability p.
        """
        maskable = ~self._is_special[input_ids.clamp(0, self.vocab_size - 1)]
        if attention_mask is not None:
            maskable &= attention_mask.bool()
        p = self.config.probability
        if self.config.whole_word and word_ids is not None:
            n_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
            word_draw = torch.rand((input_ids.shape[0], max(n_words, 1)), generator=generator) < p
            chosen = torch.gather(word_draw, 1, word_ids.clamp(min=0)) & (word_ids >= 0)
        else:
            chosen = torch.rand(input_ids.shape, generator=generator) < p
        return chosen & maskable

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        word_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(masked_ids, labels)`` for a [B, T] batch: labels are the original ids at the chosen
        positions and -100 elsewhere; chosen inputs become [MASK] / random / unchanged with
        probabilities ``mask_fraction`` / ``random_fraction`` / the rest."""
        chosen = self.choose(input_ids, attention_mask, word_ids, generator)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        action = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (action < self.config.mask_fraction)
        to_random = (
            chosen
            & (action >= self.config.mask_fraction)
            & (action < self.config.mask_fraction + self.config.random_fraction)
        )
        pick = torch.randint(len(self._candidates), input_ids.shape, generator=generator)
        masked = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        masked = torch.where(to_random, self._candidates[pick], masked)
        return masked, labels


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[Tensor, Tensor]:
    """Right-pad lists of ids to the longest: ``(ids [B, T], attention_mask [B, T])``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class MaskedLMBatches:
    """Random batches of whole sequences, padded and masked: the masked-LM counterpart of
    :class:`lmarch.data.batches.RandomBlockSampler`, with the same interface (``sample``,
    ``generator``, ``batch_size``, ``block_size``) so the Trainer drives either.

    ``sequences`` are token ids with their specials already in place ([CLS] ... [SEP]);
    ``word_ids`` (same shapes, -1 at specials) enable whole-word masking. Each batch is
    ``(masked_ids, attention_mask, labels)``; with ``with_noise`` a fourth tensor of uniform
    numbers [B, T] follows, for objectives that sample (ELECTRA's generator) reproducibly.
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        collator: MaskedLMCollator,
        batch_size: int,
        pad_id: int,
        word_ids: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        with_noise: bool = False,
    ) -> None:
        if not sequences:
            raise ValueError("no sequences to draw masked-LM batches from")
        self.sequences = [list(s) for s in sequences]
        self.word_ids = [list(w) for w in word_ids] if word_ids is not None else None
        self.collator = collator
        self.batch_size = batch_size
        self.block_size = max(len(s) for s in self.sequences)
        self.pad_id = pad_id
        self.with_noise = with_noise
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """One batch drawn from ``generator`` (default: the sampler's own)."""
        g = generator or self.generator
        rows = torch.randint(len(self.sequences), (self.batch_size,), generator=g).tolist()
        ids, mask = pad_sequences([self.sequences[r] for r in rows], self.pad_id)
        words = None
        if self.word_ids is not None:
            words, _ = pad_sequences([self.word_ids[r] for r in rows], -1)
        masked, labels = self.collator(ids, mask, words, generator=g)
        if self.with_noise:
            return masked, mask, labels, torch.rand(ids.shape, generator=g)
        return masked, mask, labels

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state: where this sampler is in its random order."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from a saved position."""
        self.generator.set_state(state["generator"])


def word_ids_from_pieces(pieces: Sequence[str], special: Sequence[bool]) -> list[int]:
    """Word index of each WordPiece: a piece starting with ``##`` continues the previous word;
    special tokens get -1."""
    out, word = [], -1
    for piece, is_special in zip(pieces, special):
        if is_special:
            out.append(-1)
            continue
        if not piece.startswith("##") or word < 0:
            word += 1
        out.append(word)
    return out


def pack_lines(
    line_ids: Sequence[Sequence[int]],
    max_length: int,
    cls_id: int,
    sep_id: int,
    line_word_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Pack consecutive lines into sequences ``[CLS] line line ... [SEP]`` of at most
    ``max_length`` tokens (BERT fills its inputs with whole sentences the same way); a line too
    long for one sequence is cut. Word ids, if given, are renumbered per sequence."""
    budget = max_length - 2
    if budget < 1:
        raise ValueError(f"max_length must be at least 3, got {max_length}")
    sequences: list[list[int]] = []
    words_out: list[list[int]] | None = [] if line_word_ids is not None else None
    cur: list[int] = []
    cur_words: list[int] = []

    def flush() -> None:
        if cur:
            sequences.append([cls_id, *cur, sep_id])
            if words_out is not None:
                words_out.append([-1, *cur_words, -1])

    for i, ids in enumerate(line_ids):
        ids = list(ids)[:budget]
        if not ids:
            continue
        if len(cur) + len(ids) > budget:
            flush()
            cur, cur_words = [], []
        offset = (max(cur_words) + 1) if cur_words else 0
        cur.extend(ids)
        if line_word_ids is not None:
            cur_words.extend(w + offset for w in list(line_word_ids[i])[: len(ids)])
    flush()
    return sequences, words_out


__all__ = [
    "IGNORE_INDEX",
    "MaskedLMBatches",
    "MaskedLMCollator",
    "MaskingConfig",
    "pack_lines",
    "pad_sequences",
    "word_ids_from_pieces",
]
