"""Shared fixtures: small real text and tiny models, so tests stay fast on two cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmarch.data.corpus import TINY_SHAKESPEARE

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The first 200,000 characters of tinyshakespeare (real text, small enough to be quick)."""
    return TINY_SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


@pytest.fixture
def small_text_file(tmp_path: Path, shakespeare_text: str) -> Path:
    """A 60,000-character slice of Shakespeare written to a temporary .txt file."""
    path = tmp_path / "tiny.txt"
    path.write_text(shakespeare_text[:60_000], encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """Tiny models on a shared two-core machine run far faster on one thread than on two
    contending ones; use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
