"""Weights shipped as a file cut into chunks across several pip packages (a registry caps each
package's size), joined once into a cache file.

The joined file is written under a temporary name beside its final one and renamed into place
only once its size (and, when known, its SHA-256) is right, so an interrupted join never leaves a
file that looks whole. Later loads find the cache file and check its size only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lmarch.errors import LmarchError

CACHE_DIR_ENV = "LMARCH_CACHE"  # overrides ~/.cache/lmarch


@dataclass(frozen=True)
class ChunkedFile:
    """A file cut into ``parts``: ``(package, path inside it)`` in order; ``size`` and
    ``sha256`` of the whole; ``install`` is what a user runs to get the packages."""

    name: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str | None
    install: str


def cache_dir() -> Path:
    """Where joined files are kept: ``$LMARCH_CACHE`` or ``~/.cache/lmarch``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "lmarch")


def _part_paths(spec: ChunkedFile) -> list[Path]:
    paths = []
    for package, relative in spec.parts:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise LmarchError(
                f"{spec.name} is not installed (package {package} is missing): run {spec.install}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / relative
        if not path.is_file():
            raise LmarchError(f"{spec.name}: part {path} is missing: run {spec.install}")
        paths.append(path)
    return paths


def assemble(spec: ChunkedFile, directory: Path | None = None) -> Path:
    """The joined file of ``spec`` in the cache (``directory``, default :func:`cache_dir`),
    joining the parts first if it is not there yet; a missing part names the install command."""
    target = (directory or cache_dir()) / spec.name
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    paths = _part_paths(spec)
    total = sum(p.stat().st_size for p in paths)
    if total != spec.size:
        raise LmarchError(
            f"{spec.name}: the parts hold {total} bytes, the whole file has {spec.size}",
            hint=f"reinstall them: {spec.install}",
        )
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if tmp.stat().st_size != spec.size:
            raise LmarchError(f"{spec.name}: joined {tmp.stat().st_size} bytes, not {spec.size}")
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise LmarchError(
                f"{spec.name}: the joined parts have SHA-256 {digest.hexdigest()}, "
                f"expected {spec.sha256}",
                hint=f"reinstall them: {spec.install}",
            )
        os.replace(tmp, target)
    except OSError as exc:
        raise LmarchError(f"cannot write {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


__all__ = ["CACHE_DIR_ENV", "ChunkedFile", "assemble", "cache_dir"]
