"""Tokenizers written out: character-level and byte-level BPE (trainable)."""

from lmarch.tokenizers.base import Tokenizer, load_tokenizer
from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
from lmarch.tokenizers.char import CharTokenizer

__all__ = ["ByteLevelBPETokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer"]
