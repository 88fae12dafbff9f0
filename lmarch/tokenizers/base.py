"""The interface every tokenizer shares, and loading one from its saved JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lmarch.errors import LmarchError


@runtime_checkable
class Tokenizer(Protocol):
    """Maps text to integer ids and back.

    Implementations save themselves as one JSON file whose top-level ``"type"`` field names
    the class (``"char"``, ``"byte_bpe"``, ``"wordpiece"``, ``"unigram"``; ``"hf_tokenizers"`` for the
    :mod:`~lmarch.tokenizers.hf_fallback` adapter), so :func:`load_tokenizer` can rebuild them.
    """

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


def write_json_file(path: str | Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as UTF-8 JSON to ``path`` through a temporary file renamed into place, so
    a run killed mid-write keeps the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json_file(path: str | Path) -> Any:
    """A parsed JSON file; an unreadable one raises :class:`LmarchError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LmarchError(f"cannot read tokenizer file {path}: {exc}") from exc


def read_tokenizer_file(path: str | Path, kind: str, what: str) -> dict[str, Any]:
    """The JSON object of a tokenizer file whose ``"type"`` is ``kind``; anything else raises
    :class:`LmarchError` (``what`` names the tokenizer expected, e.g. "character tokenizer")."""
    data = read_json_file(path)
    if not isinstance(data, dict) or data.get("type") != kind:
        raise LmarchError(f'{path}: not a {what} (expected "type": "{kind}")')
    return data


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by any lmarch tokenizer's ``save``."""
    from lmarch.tokenizers.bpe import ByteLevelBPETokenizer
    from lmarch.tokenizers.char import CharTokenizer
    from lmarch.tokenizers.gguf_spm import SentencePieceBPETokenizer
    from lmarch.tokenizers.hf_fallback import HFTokenizersFallback
    from lmarch.tokenizers.unigram import UnigramTokenizer
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
        "unigram": UnigramTokenizer,
        "sentencepiece_bpe": SentencePieceBPETokenizer,
        "hf_tokenizers": HFTokenizersFallback,
    }
    if kind not in classes:
        raise LmarchError(
            f"{path}: unknown tokenizer type {kind!r}", hint=f"one of {sorted(classes)}"
        )
    return classes[kind].load(path)
