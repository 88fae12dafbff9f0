"""The Unigram trainer: its vocabulary compresses Shakespeare as well as sentencepiece's at the
same size, its lattice expectations equal brute-force enumeration, its layout is as asked, and a
run trained with it reloads its tokenizer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.errors import LmarchError
from lmarch.tokenizers.base import load_tokenizer
from lmarch.tokenizers.unigram import UnigramTokenizer
from lmarch.tokenizers.unigram_train import (
    ALBERT_SPECIAL_PIECES,
    _Lattice,
    digamma,
    train_unigram,
)

spm = pytest.importorskip("sentencepiece")


def _tokens_per_byte(tmp_path, vocab_size: int) -> tuple[float, float, int]:
    """Tokens per byte of tinyshakespeare (line by line) under our vocabulary and
    sentencepiece's, both of ``vocab_size`` pieces, and how many pieces they share."""
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    ours = train_unigram(text, vocab_size)
    spm.SentencePieceTrainer.train(
        input=str(TINY_SHAKESPEARE),
        model_prefix=str(tmp_path / "ref"),
        vocab_size=vocab_size,
        model_type="unigram",
        minloglevel=2,
        num_threads=1,
    )
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "ref.model"))
    assert ours.vocab_size == ref.get_piece_size() == vocab_size
    lines = text.splitlines()
    n_bytes = sum(len(line.encode()) for line in lines)
    ours_tpb = sum(len(ours.encode(line)) for line in lines) / n_bytes
    ref_tpb = sum(map(len, ref.encode(lines))) / n_bytes
    common = {p for p, _, _ in ours.pieces} & {ref.id_to_piece(i) for i in range(vocab_size)}
    print(f"tokens/byte at {vocab_size}: lmarch {ours_tpb:.4f}, sentencepiece {ref_tpb:.4f}")
    return ours_tpb, ref_tpb, len(common)


def test_tokens_per_byte_within_two_percent_of_sentencepiece(tmp_path) -> None:
    """At 1,000 pieces (sentencepiece's default layout, no byte fallback) on the whole of
    tinyshakespeare, our vocabulary's tokens per byte is within 2% of sentencepiece's.

    Measured: ours 0.3770, sentencepiece 0.3787 tokens per byte (ratio 0.9956), 947 pieces in
    common; at 2,000 pieces 0.3252 and 0.3260 (0.9977, 1,943 in common); at 4,000 pieces
    0.2932 and 0.2934 (0.9992, 3,883 in common).
    """
    ours, ref, common = _tokens_per_byte(tmp_path, 1000)
    assert abs(ours / ref - 1) <= 0.02
    assert common >= 900


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [2000, 4000])
def test_tokens_per_byte_at_larger_sizes(tmp_path, vocab_size) -> None:
    ours, ref, common = _tokens_per_byte(tmp_path, vocab_size)
    assert abs(ours / ref - 1) <= 0.02
    assert common >= 0.95 * vocab_size


def _brute_force_counts(word: str, vocab: dict[str, int], logp: np.ndarray) -> np.ndarray:
    """Expected piece counts over every segmentation of ``word``, enumerated."""
    counts = np.zeros(len(logp))
    total = 0.0
    n = len(word)
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        pieces = [word[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if all(p in vocab for p in pieces):
            prob = math.exp(sum(logp[vocab[p]] for p in pieces))
            total += prob
            for p in pieces:
                counts[vocab[p]] += prob
    return counts / total


def test_forward_backward_equals_enumeration() -> None:
    """The E step's expected counts (all words at once) equal the enumeration of every
    segmentation of each word, weighted by its count (1e-12)."""
    names = ["▁", "a", "b", "c", "▁a", "ab", "bc", "abc", "▁ab", "ca", "cab"]
    vocab = {p: i for i, p in enumerate(names)}
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(len(names))))
    words = ["▁abcab", "▁cabc", "▁a", "abcabcab", "▁bcab"]
    weights = np.array([3.0, 1.0, 7.0, 2.0, 5.0])
    lattice = _Lattice(words, vocab, max_len=4)
    got, loglik = lattice.select(np.ones(len(lattice.piece), bool)).expected_counts(
        logp, weights, len(names)
    )
    want = sum(w * _brute_force_counts(word, vocab, logp) for word, w in zip(words, weights))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert math.isfinite(loglik) and loglik < 0


def test_digamma_equals_torch() -> None:
    x = np.concatenate([np.linspace(0.5, 10, 50), np.geomspace(10, 1e7, 30)])
    want = torch.special.digamma(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(digamma(x), want, rtol=1e-10, atol=1e-10)


def test_layout_bytes_and_round_trip(shakespeare_text, tmp_path) -> None:
    """ALBERT's layout, the 256 bytes, every character of the text a piece, learned pieces in
    order of score; text comes back through encode/decode (bytes for unseen characters), and the
    saved file reloads with the same ids."""
    tok = train_unigram(
        shakespeare_text, 600, byte_fallback=True, special_pieces=ALBERT_SPECIAL_PIECES
    )
    assert tok.vocab_size == 600
    names = [p for p, _, _ in tok.pieces]
    assert names[:5] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    assert names[5:261] == [f"<0x{b:02X}>" for b in range(256)]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    scores = [s for _, s, kind in tok.pieces if kind == "normal"]
    assert scores == sorted(scores, reverse=True) and len(scores) == 339
    chars = set(shakespeare_text) - {" ", "\n"}
    assert chars <= set(names) | {c for c in chars if shakespeare_text.count(c) < 40}
    passage = " ".join(shakespeare_text[:2000].split())
    assert tok.decode(tok.encode(passage)) == passage
    assert len(tok.encode(passage)) < 0.45 * len(passage)
    odd = "Zounds! 日本 — ça va 😀 [MASK]"
    assert tok.decode(tok.encode(odd)) == odd
    assert tok.encode("日") == [tok.token_to_id("▁"), 5 + 0xE6, 5 + 0x97, 5 + 0xA5]
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(again, UnigramTokenizer) and again.pieces == tok.pieces
    assert again.encode(passage + odd) == tok.encode(passage + odd)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(LmarchError, match="vocab_size 200 leaves no room"):
        train_unigram("some text", 200, byte_fallback=True)
    with pytest.raises(LmarchError, match="no text to train"):
        train_unigram(" \n\n ", 100)
    with pytest.raises(LmarchError, match="character_coverage"):
        train_unigram("abc", 100, character_coverage=1.5)


def test_albert_run_trains_and_reloads_its_unigram_tokenizer(small_text_file, tmp_path) -> None:
    """``lmarch train --preset albert-base-v2`` (shrunk) trains a Unigram tokenizer, and the run
    folder's tokenizer.json reloads to the same ids."""
    from lmarch.train.run import train_run

    overrides = {
        "max_iters": 1, "batch_size": 2, "eval_iters": 1, "eval_interval": 1, "warmup_iters": 0,
        "log_interval": 1, "block_size": 32, "device": "cpu", "vocab_size": 500,
        "n_layer": 2, "n_embd": 64, "n_head": 2, "intermediate_size": 128, "embedding_size": 32,
    }  # fmt: skip
    out = tmp_path / "run"
    result = train_run("albert-base-v2", str(small_text_file), out, overrides, callbacks=[])
    assert result.iters == 1 and math.isfinite(result.train_loss)
    tok = load_tokenizer(out / "tokenizer.json")
    assert isinstance(tok, UnigramTokenizer) and tok.vocab_size == 500
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
    line = "First Citizen: Before we proceed any further, hear me speak."
    assert tok.decode(tok.encode(line)) == line
