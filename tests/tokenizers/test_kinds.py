"""The tokenizer kinds presets name: each builds from text, and RoBERTa's BPE has its layout."""

from __future__ import annotations

import pytest

from lmarch.errors import LmarchError
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.kinds import TOKENIZER_KINDS, build_tokenizer, roberta_bpe


def test_roberta_bpe_layout_and_merges(shakespeare_text) -> None:
    """<s> <pad> </s> <unk> are ids 0-3, the 256 bytes and the merges follow shifted by 4, and
    <mask> is the last id; the merges are exactly plain BPE's with the same budget."""
    text = shakespeare_text[:20_000]
    tok = roberta_bpe(text, vocab_size=400)
    plain = ByteLevelBPETokenizer.train(text, vocab_size=395, special_tokens=())
    assert tok.merges == plain.merges
    assert tok.vocab_size == 400
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 399)
    assert tok.special_ids == {0, 1, 2, 3, 399}
    line = "ROMEO: But soft, what light"
    assert tok.encode(line) == [i + 4 for i in plain.encode(line)]
    assert tok.decode(tok.encode(f"{line}<mask>")) == f"{line}<mask>"


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_every_kind_builds_and_round_trips(kind, shakespeare_text) -> None:
    text = shakespeare_text[:20_000]
    tok = build_tokenizer(kind, text, "", 400)
    assert tok.vocab_size <= 400
    line = "first citizen we are accounted poor citizens"  # (WordPiece splits off punctuation)
    assert tok.decode(tok.encode(line)).lower() == line


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(LmarchError, match="unknown tokenizer kind 'morfessor'"):
        build_tokenizer("morfessor", "abc", "", 100)
