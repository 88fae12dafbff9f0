"""BERT's text normalisation and pre-tokenisation, written out.

Before WordPiece sees a word, BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", and the ``BasicTokenizer`` of its release) prepares the
text in fixed steps, in this order:

1. **clean** (``clean_text``): delete NUL (U+0000), the replacement character U+FFFD and every
   control or format character (Unicode categories Cc, Cf, Co) except tab, newline and carriage
   return; turn each remaining whitespace character into a plain space;
2. **CJK** (``handle_chinese_chars``): put a space on both sides of every CJK ideograph, so that
   each one becomes a word of its own (the CJK Unified Ideographs blocks and their extensions,
   and the compatibility ideographs; kana and hangul are left alone);
3. **strip accents** (``strip_accents``; by default on exactly when lower-casing is): decompose
   to NFD and drop the nonspacing marks (category Mn), so ``"Café"`` becomes ``"Cafe"``;
4. **lower-case** (``lowercase``), one character at a time (so a final capital sigma becomes
   ``"σ"``, not ``"ς"``).

Pre-tokenisation then cuts the text into *words*: runs of whitespace separate words and are
dropped, and every punctuation character (ASCII ``!`` .. ``~`` symbols, and anything in a Unicode
P* category) is a word by itself. ``"don't!"`` gives ``["don", "'", "t", "!"]``.

This is the behaviour of the ``tokenizers`` library's ``BertNormalizer`` and
``BertPreTokenizer``, which the tests check character for character. One wrinkle: that library
classifies characters with Unicode tables from around version 9, while Python 3.11 ships
Unicode 14. The few characters whose class changed in between (new punctuation, marks and format
characters of recently encoded scripts) are listed below as exceptions, so the two agree on
every character Python knows but one (U+11938, whose canonical decomposition the reference's
tables lack). A newer Python may add differences for characters assigned after Unicode 14, and
the reference lower-cases a few letters that Python 3.11 does not know yet.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache

# Whitespace as Rust's ``char::is_whitespace`` sees it (the Unicode White_Space property).
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)

# CJK ideograph blocks that get spaces around them (BERT's ``_is_chinese_char``).
CJK_RANGES = (
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0x2F800, 0x2FA1F),
)


def _ranges(spec: str) -> frozenset[int]:
    """Code points of a space-separated list of hex values and ``LO-HI`` ranges."""
    out: set[int] = set()
    for item in spec.split():
        lo, _, hi = item.partition("-")
        out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


# Characters whose class in Python's Unicode 14 tables differs from the reference's older tables.
_NEWER_PUNCTUATION = _ranges(
    "61D 9FD A76 C77 C84 1B7D-1B7E 2E43-2E4F 2E52-2E5D 10EAD 10F55-10F59 10F86-10F89 "
    "1144B-1144F 1145A-1145B 1145D 11660-1166C 116B9 1183B 11944-11946 119E2 11A3F-11A46 "
    "11A9A-11A9C 11A9E-11AA2 11C41-11C45 11C70-11C71 11EF7-11EF8 11FFF 12FF1-12FF2 "
    "16E97-16E9A 16FE2 1E95E-1E95F"
)
_OLDER_PUNCTUATION = _ranges("166D 111C9")  # punctuation then, a symbol / a mark now
_NEWER_FORMAT = _ranges("890-891 8E2 110CD 13430-13438")
_NEWER_NONSPACING = _ranges(
    "7FD 898-89F 8CA-8E1 9FE AFA-AFF B55 C04 C3C D00 D3B-D3C D81 EBA 180F 1885-1886 1ABF-1ACE "
    "1DF6-1DFB A82C A8C5 A8FF A9BD 10D24-10D27 10EAB-10EAC 10F46-10F50 10F82-10F85 11070 "
    "11073-11074 110C2 111C9 111CF 1123E 1133B 11438-1143F 11442-11444 11446 1145E "
    "1182F-11837 11839-1183A 1193B-1193C 1193E 11943 119D4-119D7 119DA-119DB 119E0 "
    "11A01-11A0A 11A33-11A38 11A3B-11A3E 11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 "
    "11A98-11A99 11C30-11C36 11C38-11C3D 11C3F 11C92-11CA7 11CAA-11CB0 11CB2-11CB3 "
    "11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 11D97 "
    "11EF3-11EF4 16F4F 16FE4 1CF00-1CF2D 1CF30-1CF46 1E000-1E006 1E008-1E018 1E01B-1E021 "
    "1E023-1E024 1E026-1E02A 1E130-1E136 1E2AE 1E2EC-1E2EF 1E944-1E94A"
)
_OLDER_NONSPACING = _ranges("1734")  # a nonspacing mark then, a spacing one now


def is_cjk_ideograph(char: str) -> bool:
    """Whether ``char`` is in one of BERT's CJK ideograph blocks (:data:`CJK_RANGES`)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in CJK_RANGES)


def is_control(char: str) -> bool:
    """Whether cleaning deletes ``char``: NUL, U+FFFD, and Cc/Cf/Co except tab, LF and CR."""
    code = ord(char)
    if code in (0, 0xFFFD):
        return True
    if char in "\t\n\r" or code in _NEWER_FORMAT:
        return False
    return unicodedata.category(char) in ("Cc", "Cf", "Co")


def is_punctuation(char: str) -> bool:
    """Whether ``char`` is a word by itself: ASCII punctuation or a Unicode P* character."""
    code = ord(char)
    if code < 128:
        return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
    if code in _OLDER_PUNCTUATION:
        return True
    return unicodedata.category(char)[0] == "P" and code not in _NEWER_PUNCTUATION


def is_nonspacing_mark(char: str) -> bool:
    """Whether accent stripping drops ``char`` (category Mn)."""
    code = ord(char)
    if code in _OLDER_NONSPACING:
        return True
    return unicodedata.category(char) == "Mn" and code not in _NEWER_NONSPACING


class _CharTable(dict):
    """A ``str.translate`` table computed one character at a time, on first sight.

    ``rule(char)`` gives the replacement (``None`` deletes the character); results are kept,
    so the table costs one dictionary lookup per character once the text's alphabet is known.
    """

    def __init__(self, rule: object) -> None:
        super().__init__()
        self._rule = rule

    def __missing__(self, code: int) -> str | None:
        value = self._rule(chr(code))  # type: ignore[operator]
        self[code] = value
        return value


@cache
def _clean_table(clean_text: bool, handle_chinese_chars: bool) -> _CharTable:
    def rule(char: str) -> str | None:
        if clean_text:
            if is_control(char):
                return None
            if char in _WHITESPACE:
                return " "
        if handle_chinese_chars and is_cjk_ideograph(char):
            return f" {char} "
        return char

    return _CharTable(rule)


_ASCII_CLEAN = {code: None for code in range(32) if chr(code) not in "\t\n\r"}
_ASCII_CLEAN.update({ord("\t"): " ", ord("\n"): " ", ord("\r"): " ", 127: None})
_ACCENTS = _CharTable(lambda char: None if is_nonspacing_mark(char) else char)


@dataclass(frozen=True)
class BertNormalizer:
    """BERT's normalisation (clean, space out CJK ideographs, strip accents, lower-case).

    ``strip_accents=None`` strips accents exactly when ``lowercase`` is on, as BERT's uncased
    models do; see the module docstring for each step.
    """

    lowercase: bool = True
    strip_accents: bool | None = None
    handle_chinese_chars: bool = True
    clean_text: bool = True

    def normalize(self, text: str) -> str:
        """``text`` after the four steps, in the order BERT applies them."""
        if text.isascii():  # no CJK, no accents, no exotic whitespace: the quick path
            if self.clean_text:
                text = text.translate(_ASCII_CLEAN)
            return text.lower() if self.lowercase else text
        if self.clean_text or self.handle_chinese_chars:
            text = text.translate(_clean_table(self.clean_text, self.handle_chinese_chars))
        strip = self.lowercase if self.strip_accents is None else self.strip_accents
        if strip:
            text = unicodedata.normalize("NFD", text).translate(_ACCENTS)
        if self.lowercase:
            # Python lower-cases a word-final capital sigma to "ς"; per character it is "σ".
            text = text.replace("Σ", "σ").lower()
        return text


_ASCII_PUNCT = r"!-/:-@\[-`{-~"
_ASCII_SPACE = r"\t\n\x0b\x0c\r "
# A run of characters that are neither punctuation nor whitespace, or one punctuation character.
_ASCII_WORDS = re.compile(f"[^{_ASCII_PUNCT}{_ASCII_SPACE}]+|[{_ASCII_PUNCT}]")


@cache
def _word_pattern() -> re.Pattern[str]:
    """:data:`_ASCII_WORDS` for all of Unicode (built on first use: it scans the code points)."""
    # Every punctuation character lies below U+20000; the ideograph, hangul and surrogate blocks
    # in between hold none, so they are skipped to keep the first call quick.
    codes = [*range(0x3400), *range(0xA000, 0xAC00), *range(0xD800 + 0x800, 0x20000)]
    punct = "".join(re.escape(chr(c)) for c in codes if is_punctuation(chr(c)))
    space = "".join(re.escape(c) for c in _WHITESPACE)
    return re.compile(f"[^{punct}{space}]+|[{punct}]")


def bert_pre_tokenize(text: str) -> list[str]:
    """BERT's words: split on whitespace (dropped) and around each punctuation character."""
    return (_ASCII_WORDS if text.isascii() else _word_pattern()).findall(text)
