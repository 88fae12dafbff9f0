"""Tokenizers written out: character-level, byte-level BPE and WordPiece (both trainable)."""

from lmarch.tokenizers.base import Tokenizer, load_tokenizer
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.char import CharTokenizer
from lmarch.tokenizers.wordpiece import WordPieceTokenizer

__all__ = [
    "ByteLevelBPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "WordPieceTokenizer",
    "load_tokenizer",
]
