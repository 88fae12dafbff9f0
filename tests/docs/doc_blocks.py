"""Code blocks of README.md and docs/**/*.md, extracted so that the test suite runs them.

A fenced block is ```` ```bash ````, ```` ```python ````, ```` ```text ```` (prose-like output or
commands that cannot run on one machine: never run) or bare ```` ``` ````. An HTML comment on the
line right before the fence marks how a block runs:

- ``<!-- snippet: fast -->``: a bash block that also runs in the default (fast) tier;
- ``<!-- snippet: slow -->``: a python block that runs only in the slow tier (it needs what an
  earlier bash block of the same file made, or takes too long);
- ``<!-- snippet: server ARGS -->``: a block that talks to ``lmarch serve ARGS`` (slow tier only):
  the tester starts that server on a free loopback port, waits for ``/health``, points the
  block's ``127.0.0.1:8000`` (the documented default address) at it, and stops it afterwards.

Fast tier: every ``lmarch`` command line of every bash, bare or text block is parsed by the CLI
parser; every python block (unless marked slow) and every bash block marked fast runs, in order,
in one temporary folder per file. Slow tier: every bash and python block of a file runs in order
in one temporary folder.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*snippet:\s*([\w\s,-]+?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKS = {"fast", "slow"}
DEFAULT_ADDRESS = "127.0.0.1:8000"  # what a server block's text says; the tester swaps the port
PROGRAMS = {"lmarch", ".venv/bin/lmarch"}


@dataclass
class Block:
    """One fenced code block: where it is, its language, its marks and its text."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marks: set[str] = field(default_factory=set)
    text: str = ""
    server: list[str] | None = None  # ``lmarch serve`` arguments for a server block

    @property
    def where(self) -> str:
        """``file:line`` relative to the repository."""
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/, in a fixed order."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file; an unknown snippet mark is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        marks: set[str] = set()
        server: list[str] | None = None
        if i > 0 and (mm := MARKER.search(lines[i - 1])):
            words = [w for w in re.split(r"[\s,]+", mm.group(1)) if w]
            if words[0] == "server":  # the rest is the command line of the server to start
                marks, server = {"server", "slow"}, words[1:]
                if not server:
                    raise ValueError(f"{path}:{i}: 'server' needs the arguments of lmarch serve")
            else:
                marks = set(words)
            if marks - MARKS - {"server"} or ("server" in marks and server is None):
                raise ValueError(f"{path}:{i}: unknown snippet mark(s) {sorted(marks - MARKS)}")
        indent, body, j = m.group(1), [], i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        text = "\n".join(body) + "\n"
        if server is not None and DEFAULT_ADDRESS not in text:
            raise ValueError(f"{path}:{i + 1}: a server block must name {DEFAULT_ADDRESS}")
        found.append(Block(path, i + 1, m.group(2).lower(), marks, text, server))
        i = j + 1
    return found


def all_blocks() -> list[Block]:
    """Every fenced block of every documentation file."""
    return [b for path in doc_files() for b in blocks(path)]


def logical_lines(text: str) -> list[str]:
    """Shell lines of a block with continuations joined: a trailing backslash, or a quote left
    open (a prompt that spans lines), carries the line on."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        pending = f"{pending}\n{raw}" if pending else raw
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if pending.strip():
            out.append(pending)
        pending = ""
    if pending.strip():
        out.append(pending)
    return out


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block as argv lists (split at ``&&``, ``||``, ``;``, ``|``)."""
    out: list[list[str]] = []
    for line in logical_lines(text):
        argv: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in {"&&", "||", ";", "|"}:
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(token)
        if argv:
            out.append(argv)
    return out


def lmarch_commands(block: Block) -> list[list[str]]:
    """The ``lmarch ...`` commands of a bash, bare or text block, without the program name (a
    text block is never run, but the commands it shows must still parse)."""
    if block.lang not in {"bash", "sh", "shell", "", "text"}:
        return []
    text = block.text
    if block.lang in {"", "text"}:  # any text: only its lines that start 'lmarch ' (never run)
        text = "\n".join(ln for ln in logical_lines(text) if ln.lstrip().startswith("lmarch "))
    return [argv[1:] for argv in commands(text) if argv and argv[0] in PROGRAMS]


def runs_fast(block: Block) -> bool:
    """Whether the fast tier runs this block."""
    if block.lang == "python":
        return "slow" not in block.marks
    return block.lang == "bash" and "fast" in block.marks


def runs_slow(block: Block) -> bool:
    """Whether the slow tier runs this block (all bash and python blocks)."""
    return block.lang in {"bash", "python"}
