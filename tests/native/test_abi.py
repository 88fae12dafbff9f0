"""The native library's interface, declared once in lmarch.h: what Python reads from it, that it
matches what the library exports and how each C file is written, and the size check at load."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from lmarch import native
from lmarch.native import abi
from lmarch.native.gpt_block import BLOCK_PARAMETERS
from lmarch.nn.attention import MultiHeadAttention
from lmarch.nn.block import TransformerBlock
from lmarch.nn.ffn import MLP
from lmarch.nn.norm import LayerNorm

needs_native = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0)",
)
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")
C_FILES = sorted(native.HERE.glob("*.c"))


def test_signatures_are_read_from_the_header() -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    q4 = abi.FUNCTIONS["lmarch_q4_1_matmul"]
    assert q4.restype is ctypes.c_int
    assert q4.argtypes == (p, i64, i64, p, p, i64, p, ctypes.c_int)
    dropped = abi.FUNCTIONS["lmarch_add_dropped"]
    assert dropped.restype is None
    assert dropped.argtypes == (
        p,
        p,
        p,
        i64,
        i64,
        i64,
        ctypes.c_float,
        ctypes.c_uint64,
        ctypes.c_int,
    )
    assert abi.FUNCTIONS["lmarch_sgemm_check"].argtypes == ()
    assert abi.DEFINES["LMARCH_QK"] == native.QK == 32
    layer = dict(abi.STRUCTS["lmarch_layer"]._fields_)
    assert layer["eps"] is ctypes.c_float and layer["qkv"] is abi.STRUCTS["lmarch_matrix"]


def test_the_gpt_block_parameter_order_is_the_header_enum_over_the_block_state_dict() -> None:
    slots = abi.enum_names("lmarch_gpt_param", "LMARCH_GPT_")
    assert slots[:4] == ["LN1_W", "LN1_B", "QKV_W", "QKV_B"] and len(slots) == 12
    assert BLOCK_PARAMETERS[:3] == ("norm_attn.weight", "norm_attn.bias", "attn.qkv.weight")
    block = TransformerBlock(MultiHeadAttention(32, 2), MLP(32, 64), LayerNorm(32), LayerNorm(32))
    assert sorted(BLOCK_PARAMETERS) == sorted(block.state_dict())
    assert len(abi.enum_names("lmarch_gpt_saved", "LMARCH_GPT_SAVED_")) == 12


def test_every_c_file_includes_the_header_and_redeclares_nothing() -> None:
    declaration = re.compile(r"^[a-z][\w\s\*]*\blmarch_\w+\s*\([^{;]*\)\s*;", re.M)
    for path in C_FILES:
        text = path.read_text(encoding="utf-8")
        assert re.search(r'#include "(kernels|lmarch)\.h"', text), path.name
        assert declaration.findall(text) == [], path.name


@needs_compiler
def test_every_exported_definition_has_its_prototype_in_the_header() -> None:
    """Compiled with -Werror=missing-prototypes: a non-static function without a declaration in
    lmarch.h (or a definition whose types differ from it) fails."""
    for path in C_FILES:
        run = subprocess.run(
            ["cc", "-fsyntax-only", "-Werror=missing-prototypes", str(path)],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, f"{path.name}: {run.stderr}"


@needs_native
@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm to list the library's symbols")
def test_every_exported_symbol_is_declared_and_every_declaration_exported() -> None:
    path = native.build()
    assert path.name.startswith("lmarch-") and path.suffix == ".so"
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True
    )
    exported = {line.split()[-1] for line in listing.stdout.splitlines() if " T " in line}
    exported = {name for name in exported if name.startswith("lmarch_")}
    assert exported == set(abi.FUNCTIONS)


@needs_native
def test_struct_sizes_agree_and_a_mismatch_is_refused_by_name(monkeypatch) -> None:
    abi.check_struct_sizes(native.native_library())  # the library built here agrees
    wrong = SimpleNamespace(
        lmarch_sizeof_matrix=lambda: ctypes.sizeof(abi.STRUCTS["lmarch_matrix"]),
        lmarch_sizeof_layer=lambda: 8,
        lmarch_sizeof_gpt_shape=lambda: ctypes.sizeof(abi.STRUCTS["lmarch_gpt_shape"]),
    )
    with pytest.raises(RuntimeError, match="struct lmarch_layer in 8 bytes .* rebuild"):
        abi.check_struct_sizes(wrong)
    # a header read differently from the one the library was built with: load refuses it
    shorter = type(
        "lmarch_gpt_shape", (ctypes.Structure,), {"_fields_": [("batch", ctypes.c_int64)]}
    )
    monkeypatch.setitem(abi.STRUCTS, "lmarch_gpt_shape", shorter)
    with pytest.raises(RuntimeError, match="lmarch_gpt_shape"):
        native.load(native.build())


def test_a_header_outside_what_abi_reads_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="double"):
        abi._parse_functions(abi._strip_comments("double lmarch_mean(const float *x, int64_t n);"))


def test_the_headers_are_named_for_what_they_hold() -> None:
    assert [p.name for p in native.HEADERS] == ["lmarch.h", "kernels.h"]
    assert not list(native.HERE.glob("blockq.h"))
