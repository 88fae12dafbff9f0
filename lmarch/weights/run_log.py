"""A run's ``metrics.jsonl``: one JSON object per line, appended line-atomically, read tolerantly.

A training run may be killed at any moment, and ``--resume`` appends to the same file. Each row
is therefore written by one ``write`` system call of the whole line (no buffered text stream
that could flush half of it), and a line left incomplete by an earlier crash is cut off before
the next append, so it never fuses with a new row. Readers skip lines that are not whole JSON
objects (a torn last line), so a figure made after a resumed run never fails on its log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _torn_tail_start(fd: int, size: int) -> int | None:
    """Where the file's unterminated last line starts, if it has one that is not valid JSON
    (a complete row merely missing its newline is kept); None when the tail is fine."""
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) == b"\n":
        return None
    start, chunk = size, 4096
    while start > 0:  # search backwards for the newline before the torn line
        lo = max(0, start - chunk)
        block = os.pread(fd, start - lo, lo)
        cut = block.rfind(b"\n")
        if cut >= 0:
            start = lo + cut + 1
            break
        start = lo
    tail = os.pread(fd, size - start, start)
    try:
        json.loads(tail)
    except ValueError:
        return start
    return None


def append_metrics(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the JSONL file ``path`` as one line, in one write.

    A torn last line (from a run killed mid-write) is removed first; a valid last row that only
    lacks its newline gets one.
    """
    line = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = _torn_tail_start(fd, size)
        if torn is not None:
            os.ftruncate(fd, torn)
            size = torn
        elif size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)  # O_APPEND: at the end, even with another writer
        if written != len(line):  # a full disk: do not leave half a row behind
            os.ftruncate(fd, size)
            raise OSError(f"{path}: only {written} of {len(line)} bytes of a log row written")
    finally:
        os.close(fd)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL log, skipping lines that are not whole JSON objects (a torn line
    left by a killed run, blank lines)."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
