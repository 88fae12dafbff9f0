"""The one nibble unpacker (lmarch.weights.gguf.unpack_nibbles), in both layouts and both array
kinds, and a check that nothing else in lmarch unpacks 4-bit codes by itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import torch

import lmarch
from lmarch.quant.blockq import pack_q4, unpack_q4
from lmarch.quant.int4 import pack_int4, unpack_int4
from lmarch.weights.gguf import unpack_nibbles

PACKED = [[0x21, 0xF0], [0x5A, 0x0E]]  # bytes of two rows: (high, low) nibbles 2/1, F/0, 5/A, 0/E


def test_block_layout_puts_low_nibbles_first() -> None:
    want = [[1, 0, 2, 15], [10, 14, 5, 0]]
    assert unpack_nibbles(np.array(PACKED, dtype=np.uint8)).tolist() == want
    assert unpack_nibbles(torch.tensor(PACKED, dtype=torch.uint8)).tolist() == want


def test_interleaved_layout_alternates_low_and_high() -> None:
    want = [[1, 2, 0, 15], [10, 5, 14, 0]]
    assert unpack_nibbles(np.array(PACKED, dtype=np.uint8), interleaved=True).tolist() == want
    got = unpack_nibbles(torch.tensor(PACKED, dtype=torch.uint8), interleaved=True)
    assert got.tolist() == want


def test_output_buffer_of_another_dtype_is_filled_in_place() -> None:
    out = np.full((2, 4), -1.0, dtype=np.float32)
    assert unpack_nibbles(np.array(PACKED, dtype=np.uint8), out=out) is out
    assert out.tolist() == [[1.0, 0.0, 2.0, 15.0], [10.0, 14.0, 5.0, 0.0]]


def test_the_packers_invert_through_it() -> None:
    codes = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    codes = codes.to(torch.uint8)
    assert torch.equal(unpack_q4(pack_q4(codes)), codes)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_no_other_nibble_unpacking_in_lmarch() -> None:
    """``>> 4`` / ``right_shift(.., 4`` appear in lmarch's Python only inside unpack_nibbles."""
    root = Path(lmarch.__file__).parent
    pattern = re.compile(r">>\s*4\b|right_shift\([^)]*,\s*4\b")
    found = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(root)}:{number}")
    first, last = _unpacker_lines(root)
    assert found and all(
        f.startswith("weights/gguf.py:") and first <= int(f.split(":")[1]) <= last for f in found
    ), found


def _unpacker_lines(root: Path) -> tuple[int, int]:
    tree = ast.parse((root / "weights" / "gguf.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "unpack_nibbles")
    return fn.lineno, fn.end_lineno or fn.lineno
