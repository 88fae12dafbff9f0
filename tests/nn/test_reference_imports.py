"""lmarch/nn is the reference: no file in it imports lmarch's speed paths (native kernels,
quantised layers); those are swapped in from outside by lmarch.native.accelerate."""

from __future__ import annotations

import ast
from pathlib import Path

import lmarch.nn

FORBIDDEN = ("lmarch.native", "lmarch.quant")


def _imports(path: Path) -> list[str]:
    """Every module name an import statement in ``path`` names (``from lmarch import native``
    counts as ``lmarch.native``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_parser_sees_every_form_of_import(tmp_path: Path) -> None:
    source = "import lmarch.native\nfrom lmarch import quant\nfrom lmarch.native.abi import x\n"
    (tmp_path / "m.py").write_text(source, encoding="utf-8")
    found = _imports(tmp_path / "m.py")
    assert {"lmarch.native", "lmarch.quant", "lmarch.native.abi"} <= set(found)


def test_no_reference_block_imports_a_speed_path() -> None:
    files = sorted(Path(lmarch.nn.__file__).parent.glob("*.py"))
    assert len(files) >= 8  # attention, block, cache, ffn, norm, position, ...
    offending = [
        f"{path.name}: {name}"
        for path in files
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    ]
    assert offending == []
