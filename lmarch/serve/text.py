"""From token ids back to text while streaming: pieces are shown once they are safe (not the
start of a stop string, not inside a multi-byte character), as
:func:`lmarch.generation.stream_text` does for the command line."""

from __future__ import annotations

from collections.abc import Sequence

from lmarch.generation.sampling import StopStringMatcher
from lmarch.tokenizers.base import Tokenizer


class TextStream:
    """Feed generated ids one at a time; :meth:`feed` returns the text that may be shown now.

    ``stopped`` turns true when a stop string appears (the text before it is returned, the stop
    string never is); :meth:`flush` returns what was held back at the end.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.matcher = StopStringMatcher(list(stop))
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.stopped = False

    def feed(self, token: int) -> str:
        """Add ``token``; the newly safe text."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = self.matcher.feed(self.text)
        if cut is not None:
            self.stopped = True
            return self._show(max(cut, self.shown))
        if self.text.endswith("\ufffd"):
            return ""
        return self._show(self.matcher.safe_prefix_len(self.text))

    def flush(self) -> str:
        """Whatever was held back (a partial stop string that never completed)."""
        if self.stopped:
            return ""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        piece = self.text[self.shown : upto]
        self.shown = upto
        return piece

    @property
    def shown_text(self) -> str:
        """All text returned so far."""
        return self.text[: self.shown]

    def token_text(self, token: int) -> str:
        """One token's own text (for logprobs and the playground's token view)."""
        return self.tokenizer.decode([token])


__all__ = ["TextStream"]
