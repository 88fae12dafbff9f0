"""Character-level tokenizer: one id per distinct character of the training text.

The simplest tokenizer there is, and the one behind classic char-RNN and nanoGPT's
Shakespeare runs: the vocabulary is the sorted set of characters seen in the text, and a string
is encoded one character at a time. It cannot encode a character it has not seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmarch.errors import LmarchError
from lmarch.tokenizers.base import read_tokenizer_file, write_json_file


class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in that (sorted) alphabet."""

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise LmarchError("a character vocabulary must hold single characters")
        if len(set(chars)) != len(chars):
            raise LmarchError("a character vocabulary must not repeat characters")
        self._chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is every distinct character of ``text``, sorted."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        """Number of characters in the vocabulary."""
        return len(self._chars)

    @property
    def chars(self) -> list[str]:
        """The vocabulary: character ``i`` has id ``i``."""
        return list(self._chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``; an unseen character raises :class:`LmarchError`."""
        ids = self._ids
        try:
            return [ids[c] for c in text]
        except KeyError as exc:
            char = exc.args[0]
            raise LmarchError(
                f"character {char!r} (U+{ord(char):04X}) at position {text.index(char)} "
                "is not in the tokenizer's vocabulary",
                hint="build the tokenizer from a text that contains it",
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """The string spelled by ``ids``."""
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        chars = self._chars
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return "".join([chars[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (type(i) is int and 0 <= i < len(chars)))
            raise LmarchError(f"token id {bad!r} is not in 0..{len(chars) - 1}") from None

    def save(self, path: str | Path) -> None:
        """Write ``{"type": "char", "chars": [...]}`` to ``path``."""
        write_json_file(path, {"type": "char", "chars": self._chars}, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a file written by :meth:`save`; a malformed file raises :class:`LmarchError`."""
        data = read_tokenizer_file(path, "char", "character tokenizer")
        chars = data.get("chars")
        if not isinstance(chars, list):
            raise LmarchError(f'{path}: "chars" must be a list of characters')
        try:
            return cls(chars)
        except LmarchError as exc:
            raise LmarchError(f"{path}: {exc}") from None
