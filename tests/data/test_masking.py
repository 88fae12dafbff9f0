"""Masked-LM collator: BERT's 15% / 80-10-10 statistics, specials, whole words, determinism."""

from __future__ import annotations

import pytest
import torch

from lmarch.data.masking import (
    IGNORE_INDEX,
    MaskedLMBatches,
    MaskedLMCollator,
    MaskingConfig,
    pack_lines,
    pad_sequences,
    word_ids_from_pieces,
)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 1000


def _batch(rows: int = 256, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] random ordinary tokens [SEP] [PAD]...; every row has some padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(length // 2, length, (rows,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def test_masking_statistics_match_bert() -> None:
    """Over ~24k maskable tokens: 15% chosen (+-0.7 points, > 4 sigma), and of those 80% [MASK],
    10% random, 10% unchanged (+-2 points each, > 4 sigma at ~3,700 chosen tokens)."""
    ids, mask = _batch()
    collator = MaskedLMCollator(MASK, VOCAB, SPECIALS)
    masked, labels = collator(ids, mask, generator=torch.Generator().manual_seed(1))
    maskable = mask.bool() & (ids != CLS) & (ids != SEP)
    chosen = labels != IGNORE_INDEX
    n_maskable, n_chosen = maskable.sum().item(), chosen.sum().item()
    assert n_maskable > 20_000
    assert abs(n_chosen / n_maskable - 0.15) < 0.007
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (masked == MASK) & chosen
    unchanged = (masked == ids) & chosen
    replaced = chosen & ~as_mask & ~unchanged
    assert abs(as_mask.sum().item() / n_chosen - 0.8) < 0.02
    assert abs(replaced.sum().item() / n_chosen - 0.1) < 0.02
    # a random draw equal to the original (p = 1/995) counts as unchanged: still ~10%
    assert abs(unchanged.sum().item() / n_chosen - 0.1) < 0.02
    # positions not chosen are untouched; random replacements are never special tokens
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert not torch.isin(masked[replaced], torch.tensor(SPECIALS)).any()


def test_specials_and_padding_never_masked() -> None:
    """Even at probability 0.99, [CLS], [SEP], [PAD] and [UNK] keep their ids and get label -100."""
    ids, mask = _batch(rows=32)
    ids[:, 5] = UNK
    collator = MaskedLMCollator(MASK, VOCAB, SPECIALS, MaskingConfig(probability=0.99))
    masked, labels = collator(ids, mask, generator=torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(SPECIALS)) | (mask == 0)
    assert torch.equal(masked[special], ids[special])
    assert (labels[special] == IGNORE_INDEX).all()
    assert (labels[~special] != IGNORE_INDEX).float().mean() > 0.97


def test_whole_word_masking_takes_every_piece() -> None:
    """With whole_word, a word's pieces are all chosen or none is; words are chosen at ~15%."""
    g = torch.Generator().manual_seed(3)
    rows, length = 128, 96
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    # words of 1-4 pieces: a new word starts where a coin says so
    starts = torch.rand((rows, length), generator=g) < 0.4
    starts[:, 1] = True
    word_ids = torch.cumsum(starts.long(), dim=1) - 1
    word_ids[:, 0], word_ids[:, -1] = -1, -1
    mask = torch.ones_like(ids)
    collator = MaskedLMCollator(MASK, VOCAB, SPECIALS, MaskingConfig(whole_word=True))
    _, labels = collator(ids, mask, word_ids, generator=torch.Generator().manual_seed(4))
    chosen = labels != IGNORE_INDEX
    words_chosen = words_total = 0
    for r in range(rows):
        for w in word_ids[r].unique().tolist():
            if w < 0:
                continue
            pieces = chosen[r][word_ids[r] == w]
            assert pieces.all() or not pieces.any(), (r, w)
            words_chosen += int(pieces.any())
            words_total += 1
    assert words_total > 4000
    assert abs(words_chosen / words_total - 0.15) < 0.02
    # multi-piece words really occur among the chosen ones
    assert (torch.diff(word_ids, dim=1)[chosen[:, 1:]] == 0).any()


def test_same_generator_same_masks() -> None:
    ids, mask = _batch(rows=8)
    collator = MaskedLMCollator(MASK, VOCAB, SPECIALS)
    a = collator(ids, mask, generator=torch.Generator().manual_seed(7))
    b = collator(ids, mask, generator=torch.Generator().manual_seed(7))
    c = collator(ids, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_word_ids_from_pieces() -> None:
    pieces = ["[CLS]", "the", "runn", "##ing", "man", "##s", "[SEP]"]
    special = [True, False, False, False, False, False, True]
    assert word_ids_from_pieces(pieces, special) == [-1, 0, 1, 1, 2, 2, -1]


def test_pack_lines_fills_sequences_with_whole_lines() -> None:
    lines = [[10, 11], [12, 13, 14], [15], list(range(20, 40))]
    words = [[0, 1], [0, 0, 1], [0], list(range(20))]
    seqs, seq_words = pack_lines(lines, 8, CLS, SEP, words)
    assert seqs == [
        [CLS, 10, 11, 12, 13, 14, 15, SEP],
        [CLS, *range(20, 26), SEP],
    ]
    assert seq_words == [[-1, 0, 1, 2, 2, 3, 4, -1], [-1, 0, 1, 2, 3, 4, 5, -1]]
    with pytest.raises(ValueError):
        pack_lines(lines, 2, CLS, SEP)


def test_batches_are_padded_masked_and_reproducible() -> None:
    seqs = [[CLS, *range(10, 10 + n), SEP] for n in range(3, 30)]
    collator = MaskedLMCollator(MASK, VOCAB, SPECIALS)
    batches = MaskedLMBatches(seqs, collator, batch_size=6, pad_id=PAD, seed=5, with_noise=True)
    masked, attn, labels, noise = batches.sample()
    assert masked.shape == attn.shape == labels.shape == noise.shape
    assert masked.shape[0] == 6 and batches.block_size == 31
    assert ((masked == PAD) == (attn == 0)).all()
    again = MaskedLMBatches(seqs, collator, batch_size=6, pad_id=PAD, seed=5, with_noise=True)
    assert all(torch.equal(x, y) for x, y in zip(again.sample(), (masked, attn, labels, noise)))
    ids, m = pad_sequences([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and m.tolist() == [[1, 1, 1], [1, 0, 0]]
