"""T5 span corruption and BART text infilling + sentence permutation: exact outputs on
seeded and hand-made cases, the statistics of the papers over many samples, and the
invariants (span corruption partitions the tokens; permutation keeps the sentences)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lmarch.data.noising import (
    SpanCorruption,
    TextInfilling,
    add_sentinels,
    corrupt_spans,
    fill_spans,
    infilling_spans,
    noising_batches,
    permute_sentences,
    poisson_span_lengths,
    random_segmentation,
    random_spans_noise_mask,
    sentence_end_ids,
    sentinel_count,
    seq2seq_unigram,
    span_corruption_lengths,
    span_corruption_window,
    split_sentences,
    token_windows,
)
from lmarch.data.seq2seq import Seq2SeqSpecials
from lmarch.errors import LmarchError

V, EOS = 1000, 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _runs(mask: torch.Tensor) -> int:
    return int((mask[1:] & ~mask[:-1]).sum()) + int(mask[0])


def test_the_papers_span_corruption_example() -> None:
    """Raffel et al. 2020, fig. 2: 'for inviting' and 'last' dropped, <X> and <Y> the first
    two sentinels (the last ids of the vocabulary)."""
    words = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
    ids = list(range(10, 10 + len(words)))
    mask = torch.tensor([w in ("for", "inviting", "last") for w in words])
    x, y = V - 1, V - 2
    inputs, targets = corrupt_spans(ids, mask, V, EOS)
    assert inputs == [10, 11, x, 14, 15, 16, 17, y, 19, 20, EOS]
    assert targets == [x, 12, 13, y, 18, EOS]


def test_seeded_span_corruption_is_exact_and_reproducible() -> None:
    tokens = list(range(10, 30))
    make = SpanCorruption(vocab_size=V, eos_id=EOS)
    pair = make(tokens, _gen(0))
    assert pair == make(tokens, _gen(0))
    # 20 tokens: 3 noise tokens in 1 span (round(3 / 3)), laid out by seed 0
    assert pair == ([*range(10, 27), V - 1, EOS], [V - 1, 27, 28, 29, EOS])
    # 40 tokens: 6 noise tokens in 2 spans (lengths 2 and 4), the last span ending the text
    inputs, targets = make(list(range(10, 50)), _gen(5))
    assert inputs == [*range(10, 19), V - 1, *range(21, 46), V - 2, EOS]
    assert targets == [V - 1, 19, 20, V - 2, 46, 47, 48, 49, EOS]


def test_segmentation_is_uniform_over_compositions() -> None:
    """Cutting 4 items into 2 non-empty parts: (1,3), (2,2), (3,1) each about a third."""
    g = _gen(0)
    counts = Counter(tuple(random_segmentation(4, 2, g)) for _ in range(3000))
    assert set(counts) == {(1, 3), (2, 2), (3, 1)}
    assert all(abs(c / 3000 - 1 / 3) < 0.03 for c in counts.values())


def test_noise_density_and_mean_span_length_over_many_samples() -> None:
    """Over 2000 sequences of 20-400 tokens: 15% noise (within 0.005) in spans of mean
    length 3 (within 0.1), every sequence starting with a non-noise token."""
    g = _gen(1)
    total = noise = spans = 0
    for _ in range(2000):
        n = int(torch.randint(20, 400, (1,), generator=g))
        mask = random_spans_noise_mask(n, g)
        assert not mask[0]
        total, noise, spans = total + n, noise + int(mask.sum()), spans + _runs(mask)
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.1


def _restore(inputs: list[int], targets: list[int]) -> list[int]:
    """The original sequence: each sentinel of the input replaced by its span in the target."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t >= V - 100:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t >= V - 100 else [t])
    return out


@pytest.mark.parametrize("seed", range(20))
def test_span_corruption_partitions_the_tokens(seed) -> None:
    """Every token is in exactly one of input and target, and putting each span back at its
    sentinel gives the sequence back; lengths are what span_corruption_lengths says."""
    g = _gen(seed)
    n = int(torch.randint(2, 300, (1,), generator=g))
    tokens = torch.randint(2, V - 100, (n,), generator=g).tolist()
    inputs, targets = SpanCorruption(V, EOS)(tokens, g)
    plain = [t for t in inputs[:-1] + targets[:-1] if t < V - 100]
    assert Counter(plain) == Counter(tokens)
    assert _restore(inputs, targets) == tokens
    assert inputs[-1] == targets[-1] == EOS
    assert (len(inputs), len(targets)) == span_corruption_lengths(n)


def test_window_fills_the_input_length_and_sentinels_run_out_with_a_message() -> None:
    n = span_corruption_window(128)
    assert span_corruption_lengths(n)[0] <= 128 < span_corruption_lengths(n + 1)[0]
    assert n == 141
    with pytest.raises(LmarchError, match="make 2 noise spans, but the vocabulary has only 1"):
        SpanCorruption(V, EOS, n_sentinels=1)(list(range(10, 50)), _gen(0))


def test_fill_spans_replaces_each_span_by_one_mask() -> None:
    """Spans of lengths 2, 0 (an insertion) and 1 -> three masks."""
    assert fill_spans([10, 11, 12, 13, 14, 15], [(1, 2), (4, 0), (5, 1)], 99) == [
        10, 99, 13, 99, 14, 99,
    ]  # fmt: skip


def test_seeded_text_infilling_is_exact() -> None:
    bart = Seq2SeqSpecials(pad_id=1, eos_id=2, decoder_start_id=2, bos_id=0)
    make = TextInfilling(mask_id=99, specials=bart)
    tokens = list(range(10, 30))
    source, target = make(tokens, _gen(0))
    assert source == [0, *range(10, 21), 99, *range(27, 30), 2]  # 6 tokens = ceil(0.3 * 20)
    assert target == [0, *tokens, 2]
    assert make(tokens, _gen(0)) == (source, target)


def test_poisson_lengths_fill_the_budget_exactly() -> None:
    g = _gen(3)
    for budget in (1, 5, 30, 200):
        assert sum(poisson_span_lengths(budget, g, 3.0)) == budget


def test_infilling_statistics_over_many_samples() -> None:
    """Over 2000 sequences of 50-400 tokens: 30% masked (within 0.01), span lengths with
    mean 3 (within 0.15; the last span of each is cut to the budget) and about e^-3 = 5% of
    them empty (inserted masks); spans are in order and never overlap."""
    g = _gen(1)
    total = masked = 0
    lengths: list[int] = []
    for _ in range(2000):
        n = int(torch.randint(50, 400, (1,), generator=g))
        spans = infilling_spans(n, g)
        ends = [s + ln for s, ln in spans]
        assert all(e <= s for e, (s, _) in zip(ends, spans[1:], strict=False)) and ends[-1] <= n
        total += n
        masked += sum(ln for _, ln in spans)
        lengths += [ln for _, ln in spans]
    assert abs(masked / total - 0.3) < 0.01
    assert abs(sum(lengths) / len(lengths) - 3.0) < 0.15
    assert abs(lengths.count(0) / len(lengths) - 0.0498) < 0.01


def test_sentence_permutation_keeps_the_sentences() -> None:
    """The multiset of sentences is kept (a trailing piece without an end counts as one),
    and different seeds give different orders."""
    end = 5
    tokens = [1, 2, end, 3, end, 4, 4, end, 7, end, 8, 9]
    sentences = split_sentences(tokens, {end})
    assert sentences == [[1, 2, end], [3, end], [4, 4, end], [7, end], [8, 9]]
    orders = set()
    for seed in range(30):
        permuted = permute_sentences(tokens, {end}, _gen(seed))
        assert len(permuted) == len(tokens)
        # the trailing piece may land mid-text, so cut the result along the known sentences
        assert sorted(_resplit(permuted, sentences)) == sorted(sentences)
        orders.add(tuple(permuted))
    assert len(orders) > 10


def _resplit(tokens: list[int], sentences: list[list[int]]) -> list[list[int]]:
    """Cut ``tokens`` into consecutive pieces that are each one of ``sentences``."""
    out, pos, left = [], 0, [tuple(s) for s in sentences]
    while pos < len(tokens):
        match = next(s for s in left if tuple(tokens[pos : pos + len(s)]) == s)
        left.remove(match)
        out.append(list(match))
        pos += len(match)
    return out


def test_denoising_target_is_the_original_and_input_holds_masks() -> None:
    bart = Seq2SeqSpecials(pad_id=1, eos_id=2, decoder_start_id=2, bos_id=0)
    tokens = [10, 11, 5, 12, 13, 14, 5, 15, 16, 5] * 4
    make = TextInfilling(mask_id=99, specials=bart, sentence_ends=frozenset({5}), max_length=20)
    source, target = make(tokens, _gen(2))
    assert target == [0, *tokens, 2]
    assert 99 in source and source[0] == 0 and source[-1] == 2 and len(source) <= 20


def test_sentinels_come_last_and_never_from_text(shakespeare_text) -> None:
    tok = seq2seq_unigram(shakespeare_text[:20_000], 600, extra_ids=100, mask_token=True)
    assert tok.vocab_size == 600 and sentinel_count(tok) == 100
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.token_to_id("<extra_id_0>") == 599 and tok.token_to_id("<extra_id_99>") == 500
    ids = tok.encode("To be, or not to be <extra_id_0> that is the question.")
    assert max(ids) < 500
    assert add_sentinels(tok) is tok
    ends = sentence_end_ids(tok)
    assert tok.token_to_id(".") in ends and all(tok.decode([i]).rstrip()[-1] in ".!?" for i in ends)


def test_token_windows() -> None:
    assert token_windows(range(10), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert token_windows(range(9), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


class _Tok:
    """A stand-in tokenizer: ids 0-9 are words, 10 is '.', then optionally a mask and
    sentinels."""

    def __init__(self, size: int, mask_id: int | None = None, sentinels: int = 0) -> None:
        self.vocab_size, self.mask_id, self.sentinels = size, mask_id, sentinels

    def decode(self, ids: list[int]) -> str:
        return "." if ids == [10] else f"w{ids[0]} "

    def token_to_id(self, token: str) -> int | None:
        index = int(token[len("<extra_id_") : -1])
        return self.vocab_size - 1 - index if index < self.sentinels else None


def test_noising_batches_make_seq2seq_batches_that_fit() -> None:
    """Span batches: windows as long as fit 16 input tokens, inputs <= 16; denoising batches:
    windows of 16 - 2 tokens wrapped in <s> </s>, sentence ends found by their text."""
    t5 = Seq2SeqSpecials(pad_id=0, eos_id=1, decoder_start_id=0)
    ids = [2 + (i % 9) if i % 7 else 10 for i in range(400)]
    batches = noising_batches(_Tok(200, sentinels=100), ids, "span", t5, 16, 8, seed=0)
    assert batches.block_size == span_corruption_window(16) == 17
    inputs, mask, decoder_inputs, labels = batches.sample()
    assert inputs.shape[1] <= 16 and inputs.shape[0] == 8
    assert (labels[:, 0] == 199).all()  # every target starts with <extra_id_0>
    bart = Seq2SeqSpecials(pad_id=1, eos_id=0, decoder_start_id=0, bos_id=11)
    batches = noising_batches(_Tok(20, mask_id=12), ids, "denoise", bart, 16, 8, seed=0)
    assert batches.block_size == 14 and batches.make_pair.sentence_ends == frozenset({10})
    inputs, mask, decoder_inputs, labels = batches.sample()
    assert labels.shape[1] == 16 and (inputs == 12).any(dim=1).all()


def test_noising_batches_refuse_what_cannot_work() -> None:
    t5 = Seq2SeqSpecials(pad_id=0, eos_id=1, decoder_start_id=0)
    with pytest.raises(LmarchError, match="needs 7 sentinels <extra_id_i> at the end of the vo"):
        noising_batches(_Tok(200, sentinels=3), list(range(500)), "span", t5, 128, 8, seed=0)
    with pytest.raises(LmarchError, match="denoising needs a mask token, and this _Tok has none"):
        noising_batches(_Tok(200), list(range(500)), "denoise", t5, 128, 8, seed=0)
    with pytest.raises(LmarchError, match="the validation text has only 40 tokens, too few for"):
        noising_batches(_Tok(200, sentinels=100), list(range(40)), "span", t5, 128, 8, 0,
                        "validation text")  # fmt: skip
