"""Tests for lmarch.generation.sampling, with Hugging Face's logits processors as the oracle."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmarch.errors import LmarchError
from lmarch.generation.sampling import (
    SamplingConfig,
    StopStringMatcher,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
    select_next_token,
)

SHAPES = [(1, 7), (3, 50), (4, 1000)]


def _random_logits(shape: tuple[int, int], seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale


def _random_ids(batch: int, vocab: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def _assert_same_filtering(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(theirs))
    assert kept.any(dim=-1).all()  # every row keeps at least one token
    torch.testing.assert_close(ours[kept], theirs[kept], atol=1e-6, rtol=0)


# --- filters against the oracle -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(shape: tuple[int, int], penalty: float) -> None:
    logits = _random_logits(shape, seed=shape[1])
    ids = _random_ids(shape[0], shape[1], length=12, seed=1)  # with repeated ids
    ours = apply_repetition_penalty(logits, ids, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    untouched = torch.ones_like(logits, dtype=torch.bool).scatter(1, ids, False)
    assert torch.equal(ours[untouched], logits[untouched])
    assert not torch.equal(ours, logits)


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    ids = torch.tensor([[0, 1, 1, 3]])
    expected = torch.tensor([[1.0, -4.0, 1.0, 0.0]])
    assert torch.equal(apply_repetition_penalty(logits, ids, 2.0), expected)
    assert apply_repetition_penalty(logits, ids, 1.0) is logits


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_matches_transformers(shape: tuple[int, int], k: int) -> None:
    logits = _random_logits(shape, seed=10 + k)
    ours = apply_top_k(logits, k)
    _assert_same_filtering(ours, TopKLogitsWarper(k)(None, logits.clone()))
    assert torch.isfinite(ours).sum(dim=-1).tolist() == [min(k, shape[1])] * shape[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_transformers(shape: tuple[int, int], p: float) -> None:
    logits = _random_logits(shape, seed=int(p * 100))
    ours = apply_top_p(logits, p)
    _assert_same_filtering(ours, TopPLogitsWarper(p)(None, logits.clone()))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(apply_top_p(logits, 0.45)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(apply_top_p(logits, 1e-9)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(shape: tuple[int, int], min_p: float) -> None:
    logits = _random_logits(shape, seed=int(min_p * 1000))
    ours = apply_min_p(logits, min_p)
    _assert_same_filtering(ours, MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.7),
        SamplingConfig(temperature=1.5, top_k=20, top_p=0.9),
        SamplingConfig(temperature=0.8, top_p=0.95, min_p=0.05, repetition_penalty=1.2),
        SamplingConfig(temperature=1.0, top_k=3, min_p=0.2, repetition_penalty=1.5),
    ],
)
def test_processing_chain_matches_transformers(
    shape: tuple[int, int], config: SamplingConfig
) -> None:
    logits = _random_logits(shape, seed=7)
    ids = _random_ids(shape[0], shape[1], length=20, seed=8)
    theirs = logits.clone()
    if config.repetition_penalty != 1.0:
        theirs = RepetitionPenaltyLogitsProcessor(config.repetition_penalty)(ids, theirs)
    theirs = TemperatureLogitsWarper(config.temperature)(ids, theirs)
    if config.top_k is not None:
        theirs = TopKLogitsWarper(config.top_k)(ids, theirs)
    if config.top_p is not None:
        theirs = TopPLogitsWarper(config.top_p)(ids, theirs)
    if config.min_p is not None:
        theirs = MinPLogitsWarper(config.min_p)(ids, theirs)
    _assert_same_filtering(process_logits(logits, config, ids), theirs)


# --- selecting the token ------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = _random_logits((5, 300), seed=3)
    config = SamplingConfig(temperature=0.0, top_k=2, top_p=0.1)
    assert torch.equal(select_next_token(logits, config, None, None), logits.argmax(dim=-1))


def test_greedy_sees_the_repetition_penalty() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    ids = torch.tensor([[0], [2]])
    config = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert select_next_token(logits, config, ids, None).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible() -> None:
    logits = _random_logits((4, 100), seed=5, scale=1.0)
    config = SamplingConfig(temperature=0.9, top_p=0.95)
    draws = [
        select_next_token(logits, config, None, torch.Generator().manual_seed(123))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert draws[0].shape == (4,) and draws[0].dtype == torch.int64
    more = [
        select_next_token(logits, config, None, torch.Generator().manual_seed(s)) for s in range(8)
    ]
    assert len({tuple(d.tolist()) for d in more}) > 1  # different seeds, different draws


def test_top_k_one_equals_greedy() -> None:
    logits = _random_logits((6, 500), seed=11, scale=0.5)
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 5.0):
        config = SamplingConfig(temperature=temperature, top_k=1)
        chosen = select_next_token(logits, config, None, generator)
        assert torch.equal(chosen, logits.argmax(dim=-1))


def test_sampling_frequencies_follow_softmax() -> None:
    logits = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.5, 0.8, 0.1])
    draws = 20_000
    chosen = select_next_token(
        logits.expand(draws, -1), SamplingConfig(), None, torch.Generator().manual_seed(2024)
    )
    frequencies = torch.bincount(chosen, minlength=logits.numel()).float() / draws
    assert (frequencies - logits.softmax(dim=-1)).abs().max().item() < 0.01


def test_filtered_tokens_are_never_drawn() -> None:
    logits = _random_logits((2000, 20), seed=9, scale=0.3)
    config = SamplingConfig(top_k=4)
    chosen = select_next_token(logits, config, None, torch.Generator().manual_seed(1))
    allowed = torch.topk(logits, 4, dim=-1).indices
    assert (allowed == chosen[:, None]).any(dim=-1).all()


def test_logits_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match="batch, vocab"):
        select_next_token(torch.zeros(5), SamplingConfig(), None, None)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(LmarchError, match=field) as info:
        SamplingConfig(**kwargs)
    assert info.value.hint


def test_config_defaults_are_plain_sampling() -> None:
    config = SamplingConfig()
    assert (config.temperature, config.top_k, config.top_p, config.min_p) == (1.0, None, None, None)
    assert config.repetition_penalty == 1.0 and not config.greedy
    assert SamplingConfig(temperature=0).greedy


# --- stop strings -------------------------------------------------------------------------------


def test_stop_string_spanning_two_chunks() -> None:
    matcher = StopStringMatcher(["\n\nUser:"])
    text = "Hello there.\n\nUs"
    assert matcher.feed(text) is None
    assert matcher.safe_prefix_len(text) == len("Hello there.")  # "\n\nUs" is held back
    text += "er: hi"
    assert matcher.feed(text) == len("Hello there.")
    assert matcher.safe_prefix_len(text) == len("Hello there.")
    assert matcher.feed(text + " more") == len("Hello there.")  # the match sticks


def test_stop_string_streaming_transcript() -> None:
    matcher = StopStringMatcher(["END"])
    chunks = ["The q", "uick E", "N", "D", " fox"]
    text, shown, result = "", 0, None
    shown_after = []
    for chunk in chunks:
        text += chunk
        result = matcher.feed(text)
        if result is not None:
            shown = result
            break
        shown = matcher.safe_prefix_len(text)
        shown_after.append(text[:shown])
    assert shown_after == ["The q", "The quick ", "The quick "]
    assert (result, text[:shown]) == (10, "The quick ")


def test_earliest_of_several_stop_strings() -> None:
    matcher = StopStringMatcher(["</s>", "###", "\nQ:"])
    text = "answer ### more </s>"
    assert matcher.feed(text) == 7
    assert matcher.find(text, start=8) == 16
    assert matcher.safe_prefix_len(text) == 7
    assert StopStringMatcher(["b", "abc"]).feed("xxabc") == 2


def test_no_stop_string() -> None:
    matcher = StopStringMatcher(["STOP", "##"])
    assert matcher.feed("plain text") is None
    assert matcher.safe_prefix_len("plain text") == 10
    assert matcher.safe_prefix_len("ends with #") == 10  # "#" may begin "##"
    assert matcher.safe_prefix_len("ends with ST") == 10  # "ST" may begin "STOP"
    assert matcher.safe_prefix_len("ends with SP") == 12
    assert matcher.safe_prefix_len("") == 0
    assert StopStringMatcher([]).safe_prefix_len("anything") == 8


def test_longest_pending_prefix_is_held_back() -> None:
    matcher = StopStringMatcher(["abab", "bax"])
    assert matcher.safe_prefix_len("xaba") == 1  # "aba" may begin "abab"
    assert matcher.safe_prefix_len("xab") == 1
    assert matcher.safe_prefix_len("xba") == 1  # "ba" may begin "bax"


def test_feed_restarts_on_a_new_text() -> None:
    matcher = StopStringMatcher(["zz"])
    assert matcher.feed("a long text without it") is None
    assert matcher.feed("zz") == 0  # not an extension: searched from the start
    assert matcher.feed("a") is None  # a new text forgets the old match
    matcher.reset()
    assert matcher.feed("abc") is None


def test_feed_sees_a_revised_last_character() -> None:
    # A token ending inside a multi-byte character decodes to U+FFFD until the next one lands.
    matcher = StopStringMatcher(["aé"])
    assert matcher.feed("xxa\ufffd") is None
    assert matcher.feed("xxaé") == 2
    assert matcher.feed("xxaé and on") == 2


def test_incremental_feed_equals_full_search() -> None:
    """Fed one character at a time, the matcher reports the earliest stop string in the text
    as it stands when the first stop string completes."""
    stops = ["ab", "bca", "cc"]
    generator = torch.Generator().manual_seed(4)
    letters = torch.randint(0, 3, (200, 12), generator=generator)
    for row in letters.tolist():
        word = "".join("abc"[i] for i in row)
        matcher = StopStringMatcher(stops)
        found = None
        for end in range(1, len(word) + 1):
            found = matcher.feed(word[:end])
            if found is not None:
                break
        ends = [i + len(s) for s in stops if (i := word.find(s)) >= 0]
        if not ends:
            assert found is None
        else:
            prefix = word[: min(ends)]
            assert found == min(i for s in stops if (i := prefix.find(s)) >= 0)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(LmarchError, match="non-empty"):
        StopStringMatcher(["ok", ""])
