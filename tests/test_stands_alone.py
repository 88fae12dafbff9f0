"""The repository stands alone: a clone with nothing beside it has everything its tests, demo,
benchmarks and docs use, so no tracked file may point outside the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", '"' + 'shared" /', "parents[2]" + ".parent", "shared/" + "data")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".json", ""}


def _tracked_files() -> list[Path]:
    listing = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return [ROOT / name for name in listing if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_files():
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or path.stat().st_size > 2**20:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {bad}" for bad in OUTSIDE if bad in text]
    assert offenders == []


def test_vendored_corpus_is_char_rnn_tinyshakespeare() -> None:
    """The vendored file is byte for byte the char-rnn corpus its README names."""
    import hashlib

    from lmarch.data.corpus import TINY_SHAKESPEARE

    data = TINY_SHAKESPEARE.read_bytes()
    assert len(data) == 1_115_394
    digest = hashlib.sha256(data).hexdigest()
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    readme = (TINY_SHAKESPEARE.parent / "README.md").read_text(encoding="utf-8")
    assert digest in readme
