"""The tokenizer kinds a preset can name, each one trained here from the training text.

- ``char``: one id per character of the text (nanoGPT's Shakespeare tokenizer);
- ``bpe``: byte-level BPE with GPT-2's one special token ``<|endoftext|>``, after the merges;
- ``roberta-bpe``: byte-level BPE laid out as RoBERTa's vocabulary: ``<s> <pad> </s> <unk>`` take
  ids 0-3 (RoBERTa's position ids count from the padding id, which must therefore be small),
  then the bytes and merges, and ``<mask>`` last (Liu et al. 2019);
- ``wordpiece``: BERT's WordPiece with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (Devlin et al. 2019);
- ``unigram``: a SentencePiece-style Unigram model (Kudo 2018) in ALBERT's layout, ``<pad> <unk>
  [CLS] [SEP] [MASK]`` at ids 0-4 (Lan et al. 2020), with byte fallback so no text is unknown.
"""

from __future__ import annotations

from typing import Literal, get_args

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import Tokenizer
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.char import CharTokenizer

TokenizerKind = Literal["char", "bpe", "roberta-bpe", "wordpiece", "unigram"]
TOKENIZER_KINDS: tuple[str, ...] = get_args(TokenizerKind)

_ROBERTA_FRONT = ("<s>", "<pad>", "</s>", "<unk>")


def roberta_bpe(text: str, vocab_size: int) -> ByteLevelBPETokenizer:
    """A byte-level BPE of at most ``vocab_size`` ids in RoBERTa's layout (see the module doc)."""
    shift = len(_ROBERTA_FRONT)
    trained = ByteLevelBPETokenizer.train(
        text, vocab_size=vocab_size - shift - 1, special_tokens=()
    )
    vocab = {token: idx + shift for token, idx in trained.vocab.items()}
    special = {token: i for i, token in enumerate(_ROBERTA_FRONT)}
    special["<mask>"] = len(vocab) + shift
    return ByteLevelBPETokenizer(
        vocab, trained.merges, special, bos_token_id=0, pad_token_id=1, eos_token_id=2
    )


def build_tokenizer(kind: str, train_text: str, val_text: str, vocab_size: int) -> Tokenizer:
    """A tokenizer of ``kind`` (one of :data:`TOKENIZER_KINDS`): ``char`` covers every character
    of both splits; the others are trained on ``train_text`` up to ``vocab_size`` ids."""
    if kind == "char":
        return CharTokenizer.from_text(train_text + val_text)
    if kind == "bpe":
        return ByteLevelBPETokenizer.train(train_text, vocab_size=vocab_size, show_progress=True)
    if kind == "roberta-bpe":
        return roberta_bpe(train_text, vocab_size)
    if kind == "wordpiece":
        from lmarch.tokenizers.wordpiece import WordPieceTokenizer

        lines = [line for line in train_text.splitlines() if line.strip()]
        return WordPieceTokenizer.train(lines, vocab_size=vocab_size)
    if kind == "unigram":
        from lmarch.tokenizers.unigram_train import ALBERT_SPECIAL_PIECES, train_unigram

        return train_unigram(
            train_text, vocab_size, byte_fallback=True, special_pieces=ALBERT_SPECIAL_PIECES
        )
    raise LmarchError(f"unknown tokenizer kind {kind!r}", hint=f"one of {list(TOKENIZER_KINDS)}")
