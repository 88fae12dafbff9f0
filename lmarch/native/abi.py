"""The native library's interface as Python sees it, read from its one declaration: ``lmarch.h``.

The header is parsed once (a small reader for the subset of C it is kept to: integer
``#define``s, enums, ``typedef struct``s and prototypes) into

- :data:`FUNCTIONS`: each exported function's ctypes argument and result types, set on a
  loaded library by :func:`declare`;
- :data:`STRUCTS`: a ``ctypes.Structure`` per struct, whose size :func:`check_struct_sizes`
  compares at load with the size the compiler gave it (``lmarch_sizeof_<name>``);
- :data:`ENUMS` and :data:`DEFINES`: slot orders and constants (the GPT-2 block's parameter
  order, the block size), so Python never restates them.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

HEADER = Path(__file__).with_name("lmarch.h")

# One-word C types the header may use, by value; any pointer is a void pointer to ctypes.
_SCALARS: dict[str, object] = {
    "void": None,
    "int": ctypes.c_int,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float,
}


@dataclass(frozen=True)
class Function:
    """One exported function: its name and ctypes signature."""

    name: str
    restype: object
    argtypes: tuple[object, ...]


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _scalar(words: list[str], where: str) -> object:
    words = [w for w in words if w != "const"]
    if not words or words[0] not in _SCALARS:
        raise ValueError(f"lmarch.h: {where}: type {' '.join(words)!r} is not one abi.py reads")
    return _SCALARS[words[0]]


def _argument(text: str, where: str) -> object:
    if "*" in text:
        return ctypes.c_void_p
    return _scalar(text.split(), where)


def _parse_functions(text: str) -> dict[str, Function]:
    found = {}
    code = re.sub(r"^\s*#[^\n]*", " ", text, flags=re.M)  # preprocessor lines are not C
    statements = (s.strip() for s in re.split(r"[;{}]", code))
    for statement in statements:
        match = re.fullmatch(r"([\w\s\*]+?)\b(lmarch_\w+)\s*\(([^()]*)\)", statement, re.S)
        if match is None:
            continue
        ret, name, args = match.groups()
        restype = ctypes.c_void_p if "*" in ret else _scalar(ret.split(), name)
        pieces = [a.strip() for a in args.split(",")]
        argtypes = () if pieces == ["void"] else tuple(_argument(a, name) for a in pieces)
        found[name] = Function(name, restype, argtypes)
    return found


def _parse_enums(text: str) -> dict[str, dict[str, int]]:
    enums = {}
    for name, body in re.findall(r"\benum\s+(\w+)\s*\{([^}]*)\}", text):
        members, value = {}, 0
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, _, given = (part.strip() for part in item.partition("="))
            value = int(given, 0) if given else value
            members[key] = value
            value += 1
        enums[name] = members
    return enums


def _parse_structs(text: str) -> dict[str, type[ctypes.Structure]]:
    structs: dict[str, type[ctypes.Structure]] = {}
    for body, name in re.findall(r"typedef\s+struct\s*\{([^}]*)\}\s*(\w+)\s*;", text):
        fields: list[tuple[str, object]] = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            base = re.match(r"((?:const\s+)?\w+)\s*(.*)$", decl, flags=re.S)
            if base is None:
                raise ValueError(f"lmarch.h: struct {name}: cannot read {decl!r}")
            type_words, declarators = base.group(1).split(), base.group(2)
            for declarator in declarators.split(","):
                field = re.sub(r"\*|\bconst\b", " ", declarator).split()[0]
                if "*" in declarator:
                    ctype: object = ctypes.c_void_p
                elif type_words[-1] in structs:
                    ctype = structs[type_words[-1]]
                else:
                    ctype = _scalar(type_words, f"struct {name}")
                fields.append((field, ctype))
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    return structs


def _parse_defines(text: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in re.findall(r"#define\s+(LMARCH_\w+)\s+(\w+)", text)}


_TEXT = _strip_comments(HEADER.read_text(encoding="utf-8"))
FUNCTIONS: dict[str, Function] = _parse_functions(_TEXT)
ENUMS: dict[str, dict[str, int]] = _parse_enums(_TEXT)
STRUCTS: dict[str, type[ctypes.Structure]] = _parse_structs(_TEXT)
DEFINES: dict[str, int] = _parse_defines(_TEXT)


def enum_names(enum: str, prefix: str) -> list[str]:
    """The members of ``enum`` in value order with ``prefix`` removed, without a trailing count
    (a last member named ``..._N_<WORD>``): e.g. the GPT-2 block's parameter slots."""
    members = sorted(ENUMS[enum].items(), key=lambda kv: kv[1])
    if members and re.search(r"_N_[A-Z]+$", members[-1][0]):
        members = members[:-1]
    if [v for _, v in members] != list(range(len(members))) or not all(
        k.startswith(prefix) for k, _ in members
    ):
        raise ValueError(f"lmarch.h: enum {enum} must number its {prefix}* slots 0, 1, 2, ...")
    return [k.removeprefix(prefix) for k, _ in members]


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set every declared function's ctypes signature on ``lib`` (a missing one is an error)."""
    for fn in FUNCTIONS.values():
        symbol = getattr(lib, fn.name)
        symbol.argtypes, symbol.restype = list(fn.argtypes), fn.restype
    return lib


def check_struct_sizes(lib: ctypes.CDLL) -> None:
    """Compare each struct's size in the library with ctypes' (``lmarch_sizeof_<name>``).

    Raises ``RuntimeError`` naming the struct on a mismatch: the library was built from another
    header, and passing it these structs would read the wrong fields."""
    for name, struct in STRUCTS.items():
        sizeof = getattr(lib, "lmarch_sizeof_" + name.removeprefix("lmarch_"))
        built, ours = sizeof(), ctypes.sizeof(struct)
        if built != ours:
            raise RuntimeError(
                f"lmarch's native library lays out struct {name} in {built} bytes but lmarch.h, "
                f"as Python reads it, in {ours}: rebuild the library from this lmarch.h"
            )


__all__ = [
    "DEFINES",
    "ENUMS",
    "FUNCTIONS",
    "HEADER",
    "STRUCTS",
    "Function",
    "check_struct_sizes",
    "declare",
    "enum_names",
]
