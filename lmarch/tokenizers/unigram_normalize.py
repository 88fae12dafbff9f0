"""SentencePiece's normaliser: character rules, then the whitespace convention.

``Normalizer::Normalize`` in sentencepiece 0.2 runs over the UTF-8 input, one rule at a time:

1. At each position, a user-defined symbol written in the text is kept as it is (the longest
   one that matches); otherwise the longest rule of the precompiled charsmap replaces the bytes
   there (see :class:`~lmarch.tokenizers.sentencepiece_model.CharsMap`); otherwise one character
   is copied.
2. With ``remove_extra_whitespaces``, leading spaces are dropped, a replacement that follows a
   space loses its own leading spaces (so runs collapse to one), and trailing spaces are cut.
3. With ``add_dummy_prefix``, a space is put in front of the text (behind it with
   ``treat_whitespace_as_suffix``), so that a word reads the same at the start of a text as in
   its middle.
4. With ``escape_whitespaces``, every space becomes ``▁`` (U+2581), the mark pieces carry.

Models trained by lmarch carry no charsmap: their rule ``"nfkc"`` is Python's
:func:`unicodedata.normalize` NFKC, with every whitespace character turned into a space and the
other control characters removed — what sentencepiece's default ``nmt_nfkc`` table does, written
with the standard library instead of the table.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from lmarch.tokenizers.sentencepiece_model import CharsMap, copy_one_char, plain_run_pattern

SPACE_SYMBOL = "\u2581"
_WS = SPACE_SYMBOL.encode()
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
_SPACE = re.compile(r"\s")


def nfkc_rule(text: str) -> str:
    """NFKC, whitespace characters to spaces, other control characters removed (see the module
    docstring)."""
    text = unicodedata.normalize("NFKC", text)
    return _SPACE.sub(" ", _CONTROL.sub("", text))


class SentencePieceNormalizer:
    """Text -> the normalised UTF-8 bytes a Unigram lattice is built over (module docstring).

    Args:
        charsmap: sentencepiece's precompiled rules, or ``None``.
        rule: ``"charsmap"`` (use ``charsmap``), ``"nfkc"`` or ``"identity"``.
        user_defined: symbols copied through unchanged wherever they appear.
    """

    def __init__(
        self,
        charsmap: CharsMap | None,
        rule: str,
        user_defined: Iterable[str] = (),
        *,
        add_dummy_prefix: bool = True,
        remove_extra_whitespaces: bool = True,
        escape_whitespaces: bool = True,
        treat_whitespace_as_suffix: bool = False,
    ) -> None:
        if rule not in ("charsmap", "nfkc", "identity"):
            raise ValueError(f"unknown normalisation rule {rule!r}")
        self.charsmap = charsmap if rule == "charsmap" else None
        self.rule = rule
        self.add_dummy_prefix = add_dummy_prefix
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self.escape_whitespaces = escape_whitespaces
        self.treat_whitespace_as_suffix = treat_whitespace_as_suffix
        self._user = sorted({s.encode() for s in user_defined if s}, key=len, reverse=True)
        self._user_first = {s[0] for s in self._user}
        excluded = set(self._user_first)
        if self.charsmap is not None:
            excluded |= self.charsmap.start_bytes
        self._plain = plain_run_pattern(excluded)

    def _prefix(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if data[pos] in self._user_first:
            for symbol in self._user:  # longest first
                if data.startswith(symbol, pos):
                    return symbol, len(symbol)
        if self.charsmap is not None:
            return self.charsmap.normalize_prefix(data, pos)
        return copy_one_char(data, pos)

    def normalize(self, text: str) -> bytes:
        """The normalised text as UTF-8 bytes (``▁`` for spaces when escaping)."""
        if self.rule == "nfkc":
            text = nfkc_rule(text)
        data = text.encode("utf-8", "surrogatepass")
        n, pos = len(data), 0
        remove = self.remove_extra_whitespaces
        if remove:
            while pos < n:
                piece, used = self._prefix(data, pos)
                if piece != b" ":
                    break
                pos += used
        if pos >= n:
            return b""
        space = _WS if self.escape_whitespaces else b" "
        out = bytearray()
        if self.add_dummy_prefix and not self.treat_whitespace_as_suffix:
            out += space
        prev_space = remove
        plain = self._plain
        while pos < n:
            run = plain.match(data, pos)
            if run is not None:  # no rule, symbol or space in it: copied through
                out += run.group()
                pos = run.end()
                prev_space = False
                continue
            piece, used = self._prefix(data, pos)
            if prev_space:
                piece = piece.lstrip(b" ")
            if piece:
                out += piece.replace(b" ", space) if self.escape_whitespaces else piece
                prev_space = piece.endswith(b" ")
            pos += used
            if not remove:
                prev_space = False
        if remove:
            while out.endswith(space):
                del out[-len(space) :]
        if self.add_dummy_prefix and self.treat_whitespace_as_suffix:
            out += space
        return bytes(out)


__all__ = ["SPACE_SYMBOL", "SentencePieceNormalizer", "nfkc_rule"]
