"""The interface every tokenizer shares, and loading one from its saved JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from lmarch.errors import LmarchError


@runtime_checkable
class Tokenizer(Protocol):
    """Maps text to integer ids and back.

    Implementations save themselves as one JSON file whose top-level ``"type"`` field names
    the class (``"char"``, ``"byte_bpe"``, ``"wordpiece"``; ``"hf_tokenizers"`` for the
    :mod:`~lmarch.tokenizers.hf_fallback` adapter), so :func:`load_tokenizer` can rebuild them.
    """

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by any lmarch tokenizer's ``save``."""
    from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
    from lmarch.tokenizers.char import CharTokenizer
    from lmarch.tokenizers.hf_fallback import HFTokenizersFallback
    from lmarch.tokenizers.wordpiece import WordPieceTokenizer

    path = Path(path)
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("type")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise LmarchError(f"cannot read tokenizer file {path}: {exc}") from exc
    classes = {
        "char": CharTokenizer,
        "byte_bpe": ByteLevelBPETokenizer,
        "wordpiece": WordPieceTokenizer,
        "hf_tokenizers": HFTokenizersFallback,
    }
    if kind not in classes:
        raise LmarchError(
            f"{path}: unknown tokenizer type {kind!r}", hint=f"one of {sorted(classes)}"
        )
    return classes[kind].load(path)
