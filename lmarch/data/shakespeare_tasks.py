"""Two sequence-to-sequence tasks made from the vendored tinyshakespeare text.

No parallel corpus or summarisation set ships in a package, so translation and summarisation
are stood in for by tasks whose targets follow from the source by an exact rule:

``shakespeare-piglatin`` (standing in for translation)
    Every spoken line -> the same line in Pig Latin. Pig Latin was chosen over "the words in
    reverse order" because its alignment is monotonic with local reordering, like translation
    between related languages, and it changes every word's spelling, so a model must learn a
    rule rather than copy tokens; a reversed line is a pure long-range copy that a subword
    model can solve without looking inside a word. The rule (:func:`pig_latin`):

    - a *word* is a maximal run of ASCII letters; everything else (spaces, punctuation, the
      apostrophes of "o'er", digits) is copied unchanged, so "o'er" is the two words "o", "er";
    - vowels are ``a e i o u`` in either case, and ``y`` when it is not a word's first letter;
    - a word starting with a vowel gets ``way`` appended ("and" -> "andway");
    - otherwise its leading consonants (everything before the first vowel, with a ``u`` that
      follows a ``q`` taken along) move to the end and ``ay`` is appended ("speak" ->
      "eakspay", "quiet" -> "ietquay", "rhythm" -> "ythmrhay"); a word without a vowel just
      gets ``ay`` ("hmm" -> "hmmay");
    - letter case: a word of two or more letters that is all capitals keeps its letters as
      they are and takes ``WAY`` / ``AY`` ("ROME" -> "OMERAY"); a word with a capital first
      letter (and lower-case letters after it) gives a result whose first letter is a capital
      and whose moved letters are lower case ("Before" -> "Eforebay"); every other word keeps
      its letters' case.

``shakespeare-speakers`` (standing in for summarisation)
    A passage of three consecutive speeches -> its speakers in order. The source is each
    speech as ``"SPEAKER: line line ..."`` (its lines joined by single spaces), the speeches
    joined by a single space; the target is the three speaker names joined by ``"; "`` (a
    semicolon, as one name, "Senators, &C", holds a comma). The passages are the
    non-overlapping windows of three speeches from the start of each play, keeping only those
    whose source is at most :data:`MAX_PASSAGE_CHARS` characters (so that a tiny model's
    encoder holds them).

Splits are made by play, so no test line or passage comes from a play seen in training.
tinyshakespeare (``lmarch/data/corpora/tinyshakespeare.txt``) is the plays of char-rnn's file
one after another without titles; each speech is a block ``"Speaker:\\nline\\n..."`` separated
by a blank line. The play boundaries are recovered from the text's structure: every play
begins with a known opening speech (:data:`PLAYS`: its speaker and first line, e.g. Richard
III's ``GLOUCESTER: Now is the winter of our discontent``), and the casts on either side of each
boundary differ (checked in the tests: no named character speaks in two splits, stock roles
such as "Messenger" or "First Citizen" apart, and the history plays' shared nobles apart).
Each opening must occur exactly once and in order, or reading fails loudly: a changed corpus
is an error, not a silently different split. The file holds nine plays (most of them
abridged): train is seven of them, ``valid`` is *The Tempest* and ``test`` is *King Richard II*.

Rows are ``{"source": ..., "target": ..., "play": ...}`` (:func:`task_rows`, or
:func:`task_pairs` as the rows of a JSONL file read); everything is deterministic (no randomness
anywhere), and the work is done once per process. ``lmarch train --objective seq2seq`` and
``lmarch translate|summarize`` take the names wherever ``--data`` takes a JSONL file: they train
on ``train`` and validate on ``valid``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.data.seq2seq import Seq2SeqPair
from lmarch.errors import LmarchError

PIG_LATIN_TASK = "shakespeare-piglatin"
SPEAKERS_TASK = "shakespeare-speakers"
SEQ2SEQ_TASKS = (PIG_LATIN_TASK, SPEAKERS_TASK)
SPLITS = ("train", "valid", "test")

PASSAGE_SPEECHES = 3
MAX_PASSAGE_CHARS = 320

# (title, opening speaker, opening line) of each play in the order of the file.
PLAYS: tuple[tuple[str, str, str], ...] = (
    ("Coriolanus", "First Citizen", "Before we proceed any further, hear me speak."),
    ("King Richard III", "GLOUCESTER", "Now is the winter of our discontent"),
    ("King Richard II", "KING RICHARD II", "Old John of Gaunt, time-honour'd Lancaster,"),
    ("Romeo and Juliet", "SAMPSON", "Gregory, o' my word, we'll not carry coals."),
    ("King Henry VI, Part 3", "WARWICK", "I wonder how the king escaped our hands."),
    ("The Winter's Tale", "ARCHIDAMUS", "If you shall chance, Camillo, to visit Bohemia, on"),
    ("Measure for Measure", "DUKE VINCENTIO", "Escalus."),
    ("The Taming of the Shrew", "SLY", "I'll pheeze you, in faith."),
    ("The Tempest", "Master", "Boatswain!"),
)
SPLIT_PLAYS = {"valid": ("The Tempest",), "test": ("King Richard II",)}

_WORD = re.compile(r"[A-Za-z]+")
_VOWELS = frozenset("aeiouAEIOU")


@dataclass(frozen=True)
class Speech:
    """One speech of tinyshakespeare: the play it belongs to, its speaker and its lines."""

    play: str
    speaker: str
    lines: tuple[str, ...]


def _pig_latin_word(word: str) -> str:
    if word[0] in _VOWELS:
        cut, suffix = 0, "way"
    else:
        cut = next(
            (i for i, ch in enumerate(word) if ch in _VOWELS or (i > 0 and ch in "yY")),
            len(word),
        )
        if 0 < cut < len(word) and word[cut - 1] in "qQ" and word[cut] in "uU":
            cut += 1
        suffix = "ay"
    if len(word) > 1 and word.isupper():
        return word[cut:] + word[:cut] + suffix.upper()
    rest, moved = word[cut:], word[:cut]
    if word[0].isupper() and rest and moved:
        rest, moved = rest[0].upper() + rest[1:], moved[0].lower() + moved[1:]
    return rest + moved + suffix


def pig_latin(text: str) -> str:
    """``text`` in Pig Latin by the exact rule of the module docstring ("Before we proceed"
    -> "Eforebay eway oceedpray")."""
    return _WORD.sub(lambda m: _pig_latin_word(m.group(0)), text)


def _parse_speeches(text: str) -> list[tuple[str, tuple[str, ...]]]:
    speeches = []
    for number, block in enumerate(re.split(r"\n\s*\n", text.strip()), start=1):
        head, _, body = block.strip("\n").partition("\n")
        lines = tuple(line.strip() for line in body.split("\n") if line.strip())
        if not head.endswith(":"):
            raise LmarchError(
                f"{TINY_SHAKESPEARE}: block {number} does not start with 'Speaker:'",
                hint="the vendored corpus is damaged; restore it from the repository",
            )
        if lines:  # a few speakers say nothing: their stage direction was cut from the file
            speeches.append((head[:-1].strip(), lines))
    return speeches


@functools.lru_cache(maxsize=1)
def play_speeches() -> tuple[Speech, ...]:
    """Every speech of tinyshakespeare with the play it belongs to (module docstring)."""
    try:
        text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    except OSError as exc:
        raise LmarchError(f"cannot read the bundled corpus {TINY_SHAKESPEARE}: {exc}") from exc
    speeches = _parse_speeches(text)
    starts = []
    for title, speaker, first in PLAYS:
        found = [i for i, (s, lines) in enumerate(speeches) if s == speaker and lines[0] == first]
        if len(found) != 1 or (starts and found[0] <= starts[-1]) or (not starts and found[0]):
            raise LmarchError(
                f"{TINY_SHAKESPEARE}: the opening of {title} ({speaker}: {first!r}) is found "
                f"{len(found)} times or out of order",
                hint="the vendored corpus differs from char-rnn's file",
            )
        starts.append(found[0])
    out = []
    bounds = [*starts, len(speeches)]
    for (title, _, _), lo, hi in zip(PLAYS, bounds, bounds[1:]):
        out.extend(Speech(title, s, lines) for s, lines in speeches[lo:hi])
    return tuple(out)


def split_of_play(title: str) -> str:
    """``"train"``, ``"valid"`` or ``"test"``: the split a play's rows belong to."""
    return next((split for split, plays in SPLIT_PLAYS.items() if title in plays), "train")


def _pig_latin_rows(speeches: tuple[Speech, ...]) -> list[dict[str, str]]:
    return [
        {"source": line, "target": pig_latin(line), "play": s.play}
        for s in speeches
        for line in s.lines
    ]


def _speaker_rows(speeches: tuple[Speech, ...]) -> list[dict[str, str]]:
    rows = []
    for title, _, _ in PLAYS:
        play = [s for s in speeches if s.play == title]
        for lo in range(0, len(play) - PASSAGE_SPEECHES + 1, PASSAGE_SPEECHES):
            window = play[lo : lo + PASSAGE_SPEECHES]
            source = " ".join(f"{s.speaker}: {' '.join(s.lines)}" for s in window)
            if len(source) <= MAX_PASSAGE_CHARS:
                target = "; ".join(s.speaker for s in window)
                rows.append({"source": source, "target": target, "play": title})
    return rows


@functools.lru_cache(maxsize=2)
def _all_rows(name: str) -> tuple[dict[str, str], ...]:
    make = _pig_latin_rows if name == PIG_LATIN_TASK else _speaker_rows
    return tuple(make(play_speeches()))


def is_bundled_task(name: str) -> bool:
    """Whether ``name`` is one of :data:`SEQ2SEQ_TASKS`."""
    return name in SEQ2SEQ_TASKS


def task_rows(name: str, split: str = "train") -> list[dict[str, str]]:
    """The rows of bundled task ``name`` in ``split`` (``train``, ``valid`` or ``test``), in
    the order of the text: ``{"source", "target", "play"}``."""
    if name not in SEQ2SEQ_TASKS:
        raise LmarchError(f"unknown bundled task {name!r}", hint=f"one of {list(SEQ2SEQ_TASKS)}")
    if split not in SPLITS:
        raise LmarchError(f"unknown split {split!r}", hint=f"one of {list(SPLITS)}")
    return [dict(row) for row in _all_rows(name) if split_of_play(row["play"]) == split]


def task_pairs(name: str, split: str = "train") -> list[Seq2SeqPair]:
    """:func:`task_rows` as :class:`~lmarch.data.seq2seq.Seq2SeqPair` rows (``line``: the
    1-based row number within the split), what JSONL files read into."""
    rows = task_rows(name, split)
    return [Seq2SeqPair(r["source"], r["target"], i) for i, r in enumerate(rows, start=1)]


def write_task_jsonl(name: str, split: str, path: str | Path) -> int:
    """Write ``task_rows(name, split)`` to ``path`` as JSONL; returns the number of rows."""
    rows = task_rows(name, split)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


__all__ = [
    "MAX_PASSAGE_CHARS",
    "PASSAGE_SPEECHES",
    "PIG_LATIN_TASK",
    "PLAYS",
    "SEQ2SEQ_TASKS",
    "SPEAKERS_TASK",
    "SPLITS",
    "SPLIT_PLAYS",
    "Speech",
    "is_bundled_task",
    "pig_latin",
    "play_speeches",
    "split_of_play",
    "task_pairs",
    "task_rows",
    "write_task_jsonl",
]
