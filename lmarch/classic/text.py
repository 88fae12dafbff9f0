"""How the classic models cut text into tokens: characters, or words.

Two word conventions, each the one its reference uses:

- the n-gram model keeps case and punctuation (``WORD_PATTERN``: words with inner apostrophes such
  as "o'er" and "ne'er", or any single other non-space character), one sentence per line, so its
  samples read as text;
- the word-vector models (word2vec, GloVe) lower-case and keep words only (``LOWER_WORD``), as the
  evaluation files they are scored on (analogies, word-pair similarities) are lower-case words.
"""

from __future__ import annotations

import re

# Words (with inner apostrophes: "o'er", "ne'er"), or any single other non-space character.
WORD_PATTERN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
WORDS_AND_LINES = re.compile(r"\n|" + WORD_PATTERN.pattern)
LOWER_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def tokenize(text: str, unit: str) -> list[list[str]]:
    """``text`` as sentences (its lines) of tokens: characters, or words and punctuation."""
    if unit == "char":
        return [list(line) for line in text.split("\n")]
    return [WORD_PATTERN.findall(line) for line in text.split("\n")]


def lower_words(text: str) -> list[str]:
    """Lower-cased words of ``text``: letters with inner apostrophes ("o'er", "king's"); digits
    and punctuation are dropped."""
    return LOWER_WORD.findall(text.lower())


def word_sentences(text: str) -> list[list[str]]:
    """:func:`lower_words` of each non-empty line of ``text`` (one sentence per line)."""
    return [words for line in text.lower().splitlines() if (words := LOWER_WORD.findall(line))]
