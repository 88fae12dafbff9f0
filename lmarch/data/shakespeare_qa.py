"""Extractive question answering data: SQuAD-layout JSONL files and the bundled "shakespeare-qa".

A JSONL row is one question about one context, in SQuAD's layout (Rajpurkar et al. 2016)::

    {"context": "...", "question": "...", "answers": {"text": ["..."], "answer_start": [17]}}

(an optional ``"id"``). Each answer is a span of the context: ``context[s : s + len(text)]``
must be ``text``; a row where it is not, or that lacks a field, is refused with one line naming
the file and line.

**shakespeare-qa** is made from the vendored tinyshakespeare file (:data:`TINY_SHAKESPEARE`),
whose speeches read ``"NAME:\\nline\\nline"`` separated by blank lines:

- the file holds excerpts of nine plays one after another; :data:`PLAYS` names each by its
  first speech, so the split is *by play*: train = the first six (Coriolanus to The Winter's
  Tale), validation = Measure for Measure, test = The Taming of the Shrew and The Tempest. Test
  characters are (but for a handful of common names) never seen in training;
- a play is cut into consecutive, non-overlapping passages of ``speeches_per_passage`` speeches
  (2 by default: an exchange); the context is the passage exactly as the file has it, speaker
  headers included;
- every speech of the passage gives one question, ``"Who says: <line>?"``, about one of its
  lines of at least three words that occur once in the context: by default the first of them
  (usually the speech's opening line, just under its header); with ``line="any"`` one picked
  by a SHA-256 hash of the play and speech number. The answer is the speaker's name, as the
  span of that speech's own header.

The default task is the one a small pretrained encoder learns in CPU minutes: MiniLM passes from
the speaker prior to reading the question after ~130 steps (exact match 97.7 on the test plays
after 200 steps, against 49.5 for either baseline). The harder setting of the first bundled
version (``speeches_per_passage=4, line="any"``: find the line, then the nearest header above
it, among four speeches) stayed at the prior within 700 CPU steps (exact match 39.4 against the
most frequent speaker's 45.9): the model never started to use the question.

Everything is deterministic: the same file gives the same examples, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmarch.data.classification import stable_rank
from lmarch.data.corpus import TINY_SHAKESPEARE
from lmarch.errors import LmarchError

SHAKESPEARE_QA = "shakespeare-qa"
_JSONL_HINT = (
    'each line must be a JSON object such as {"context": "...", "question": "...", '
    '"answers": {"text": ["..."], "answer_start": [0]}}'
)

# (title, the play's first speech in tinyshakespeare, split)
PLAYS: tuple[tuple[str, str, str], ...] = (
    ("Coriolanus", "First Citizen:\nBefore we proceed any further", "train"),
    ("King Richard III", "GLOUCESTER:\nNow is the winter of our discontent", "train"),
    ("King Richard II", "KING RICHARD II:\nOld John of Gaunt", "train"),
    ("Romeo and Juliet", "SAMPSON:\nGregory, o' my word, we'll not carry coals.", "train"),
    ("King Henry VI, Part 3", "WARWICK:\nI wonder how the king escaped our hands.", "train"),
    ("The Winter's Tale", "ARCHIDAMUS:\nIf you shall chance, Camillo", "train"),
    ("Measure for Measure", "DUKE VINCENTIO:\nEscalus.", "validation"),
    ("The Taming of the Shrew", "SLY:\nI'll pheeze you, in faith.", "test"),
    ("The Tempest", "Master:\nBoatswain!", "test"),
)
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class QAExample:
    """One question about one context; ``answers[i]`` starts at character
    ``answer_starts[i]`` of the context. ``group`` says where it came from (a play, a file)."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    group: str = ""

    def to_row(self) -> dict:
        """The example as a SQuAD-layout JSONL row."""
        return {
            "id": self.id,
            "context": self.context,
            "question": self.question,
            "answers": {"text": list(self.answers), "answer_start": list(self.answer_starts)},
        }


@dataclass
class QAData:
    """Train, validation and test examples; ``name`` says where they came from."""

    name: str
    train: list[QAExample]
    validation: list[QAExample] = field(default_factory=list)
    test: list[QAExample] = field(default_factory=list)

    def split(self, name: str) -> list[QAExample]:
        """The examples of split ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise LmarchError(f"unknown split {name!r}", hint=f"one of {', '.join(SPLITS)}")
        return getattr(self, name)


# --- JSONL --------------------------------------------------------------------------------------


def _check_row(row: object, where: str) -> tuple[str, str, list[str], list[int], str | None]:
    def bad(problem: str) -> LmarchError:
        return LmarchError(f"{where}: {problem}", hint=_JSONL_HINT)

    if not isinstance(row, dict):
        raise bad("not a JSON object")
    for key in ("context", "question"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise bad(f'no non-empty "{key}" string')
    answers = row.get("answers")
    if not isinstance(answers, dict):
        raise bad('no "answers" object')
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not isinstance(texts, list) or not isinstance(starts, list) or not texts:
        raise bad('"answers" needs lists "text" and "answer_start"')
    if len(texts) != len(starts):
        raise bad(f'"answers" has {len(texts)} texts but {len(starts)} answer_start values')
    context = row["context"]
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text.strip():
            raise bad("an answer text is empty or not a string")
        if type(start) is not int or not 0 <= start <= len(context) - len(text):
            raise bad(f"answer_start {start!r} of {text!r} is not a place in the context")
        if context[start : start + len(text)] != text:
            found = context[start : start + len(text)]
            raise bad(f"the context holds {found!r} at {start}, not the answer {text!r}")
    ident = row.get("id")
    return context, row["question"], texts, starts, None if ident is None else str(ident)


def read_qa_jsonl(path: str | Path) -> list[QAExample]:
    """Read SQuAD-layout rows from a JSONL file (blank lines skipped). Any problem (missing
    file, bad JSON, a missing field, an answer that is not at its offset, no rows) raises one
    :class:`LmarchError` naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmarchError(
            f"data file not found: {path}", hint=f"give a .jsonl file or '{SHAKESPEARE_QA}'"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmarchError(f"{path} is not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise LmarchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmarchError(f"{where}: not valid JSON ({exc.msg})", hint=_JSONL_HINT) from exc
        context, question, texts, starts, ident = _check_row(row, where)
        examples.append(
            QAExample(
                ident or f"{path.name}:{number}",
                context,
                question,
                tuple(texts),
                tuple(starts),
                group=f"{path.name}:{number}",
            )  # fmt: skip
        )
    if not examples:
        raise LmarchError(f"{path} holds no examples", hint=_JSONL_HINT)
    return examples


def split_qa_examples(
    examples: Sequence[QAExample], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[QAExample], list[QAExample]]:
    """A deterministic train/test split by context: contexts are ordered by a seeded hash and
    the first ``test_fraction`` of them (at least one when there are two or more) go to test
    with all their questions, so no test context is seen in training."""
    if not 0.0 < test_fraction < 1.0:
        raise LmarchError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    contexts = sorted({ex.context for ex in examples}, key=lambda c: stable_rank(c, seed))
    n_test = max(1, round(len(contexts) * test_fraction)) if len(contexts) >= 2 else 0
    held = set(contexts[:n_test])
    return [ex for ex in examples if ex.context not in held], [
        ex for ex in examples if ex.context in held
    ]


# --- the bundled task ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Speech:
    """One speech of the file: ``start`` / ``end`` its characters (header included, the
    blank line after it not), ``name`` the speaker, ``lines`` its spoken lines."""

    start: int
    end: int
    name: str
    lines: tuple[str, ...]


_SPEECH = re.compile(r"(?m)^(?P<name>[^\n:]+):(?:\n|\Z)(?P<body>(?:[^\n]+\n?)*)")


def parse_speeches(text: str) -> list[Speech]:
    """The speeches of a text in tinyshakespeare's layout, in order."""
    speeches = []
    for match in _SPEECH.finditer(text):
        body = match.group("body").rstrip("\n")
        end = match.start("body") + len(body) if body else match.end("name") + 1
        lines = tuple(body.split("\n")) if body else ()
        speeches.append(Speech(match.start(), end, match.group("name"), lines))
    return speeches


def play_ranges(text: str, speeches: Sequence[Speech]) -> list[tuple[str, str, int, int]]:
    """``(title, split, first speech, end speech)`` for each of :data:`PLAYS`, found by its
    first speech; a file that lacks one is refused."""
    starts = {s.start: i for i, s in enumerate(speeches)}
    found = []
    for title, opening, split in PLAYS:
        at = text.find(opening)
        if at < 0 or at not in starts:
            raise LmarchError(f"the opening of {title} is not in the tinyshakespeare file")
        found.append((title, split, starts[at]))
    return [
        (title, split, first, found[k + 1][2] if k + 1 < len(found) else len(speeches))
        for k, (title, split, first) in enumerate(found)
    ]


def _question_line(context: str, speech: Speech, key: str, line: str = "first") -> str | None:
    lines = [
        text.strip()
        for text in speech.lines
        if len(text.split()) >= 3 and context.count(text.strip()) == 1
    ]
    if not lines:
        return None
    if line == "first":
        return lines[0]
    return lines[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(lines)]


QUESTION_LINES = ("first", "any")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def shakespeare_qa(
    speeches_per_passage: int = 2, text: str | None = None, line: str = "first"
) -> QAData:
    """The bundled task (see the module docstring): passages of ``speeches_per_passage``
    speeches, one "Who says: <line>?" question per speech, split by play. ``line`` picks the
    quoted line: ``"first"`` the speech's first eligible line, ``"any"`` a hashed choice."""
    if speeches_per_passage < 1:
        raise LmarchError(f"speeches_per_passage must be >= 1, got {speeches_per_passage}")
    if line not in QUESTION_LINES:
        raise LmarchError(f"unknown question line {line!r}", hint="one of first, any")
    if text is None:
        text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    speeches = parse_speeches(text)
    data = QAData(SHAKESPEARE_QA, [], [], [])
    for title, split, first, end in play_ranges(text, speeches):
        slug = _slug(title)
        for p, at in enumerate(range(first, end - speeches_per_passage + 1, speeches_per_passage)):
            passage = speeches[at : at + speeches_per_passage]
            offset = passage[0].start
            context = text[offset : passage[-1].end]
            for k, speech in enumerate(passage):
                quoted = _question_line(context, speech, f"{slug}:{at + k}", line)
                if quoted is None:
                    continue
                data.split(split).append(
                    QAExample(
                        f"{slug}-{p:04d}-{k}",
                        context,
                        f"Who says: {quoted}?",
                        (speech.name,),
                        (speech.start - offset,),
                        group=title,
                    )  # fmt: skip
                )
    return data


def speaker_headers(context: str) -> list[str]:
    """The speaker names of a context in tinyshakespeare's layout, in order (one per speech)."""
    return [s.name for s in parse_speeches(context)]


def first_speaker_baseline(example: QAExample) -> str:
    """Baseline answer: the passage's first speaker ("" when the context has no headers)."""
    names = speaker_headers(example.context)
    return names[0] if names else ""


def frequent_speaker_baseline(example: QAExample) -> str:
    """Baseline answer: the speaker with the most speeches in the passage (ties: the one who
    speaks first); "" when the context has no headers."""
    names = speaker_headers(example.context)
    if not names:
        return ""
    counts = Counter(names)
    return max(names, key=lambda n: (counts[n], -names.index(n)))


def load_qa_data(spec: str, test_fraction: float = 0.2, seed: int = 0, **task_options) -> QAData:
    """``"shakespeare-qa"`` (options go to :func:`shakespeare_qa`) or a JSONL file. Beside
    ``X.jsonl`` (or ``X.train.jsonl``), ``X.test.jsonl`` is the test set and
    ``X.validation.jsonl`` the validation set when present; otherwise the test set is split off
    by context (:func:`split_qa_examples`) and validation is the test set."""
    if spec == SHAKESPEARE_QA:
        return shakespeare_qa(**task_options)
    path = Path(spec).expanduser()
    examples = read_qa_jsonl(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    stem = stem[: -len(".train")] if stem.endswith(".train") else stem
    test_path = path.with_name(f"{stem}.test.jsonl")
    if test_path.is_file() and test_path != path:
        train, test = examples, read_qa_jsonl(test_path)
    else:
        train, test = split_qa_examples(examples, test_fraction, seed)
    if not test or not train:
        raise LmarchError(f"{path} is too small to hold out a test set", hint="add more rows")
    val_path = path.with_name(f"{stem}.validation.jsonl")
    validation = read_qa_jsonl(val_path) if val_path.is_file() and val_path != path else test
    return QAData(str(path), train, validation, test)


__all__ = [
    "PLAYS",
    "SHAKESPEARE_QA",
    "SPLITS",
    "QAData",
    "QAExample",
    "Speech",
    "first_speaker_baseline",
    "frequent_speaker_baseline",
    "load_qa_data",
    "parse_speeches",
    "play_ranges",
    "read_qa_jsonl",
    "shakespeare_qa",
    "speaker_headers",
    "split_qa_examples",
]
