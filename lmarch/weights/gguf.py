"""Read GGUF files: metadata as Python values, tensors as (dequantised) torch tensors.

GGUF is the single-file model format of ggml / llama.cpp. A file is laid out as

    header      magic b"GGUF", version (uint32; 2 and 3 are read here), tensor count and
                key/value count (uint64 each), all little-endian
    metadata    ``kv_count`` typed key/value pairs: hyper-parameters (``llama.block_count``),
                the tokenizer (``tokenizer.ggml.tokens``, merges, ...), the chat template
    tensor info ``tensor_count`` entries of (name, n_dims, dims innermost-first, ggml type,
                offset relative to the data section)
    data        starts at the next multiple of ``general.alignment`` (default 32); each
                tensor is stored either plainly (F32, F16, BF16, ...) or as quantised
                blocks of 32 or 256 elements (Q8_0, Q4_1, Q4_K, Q6_K, ...)

Specification: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md

The header, metadata and tensor table are parsed here with ``struct`` and bounds-checked
against the file size before anything is allocated, so a damaged or hostile file fails
with one :class:`~lmarch.errors.LmarchError` naming the file and the problem, quickly and
without huge allocations. (``gguf.GGUFReader`` is not used for parsing: it walks metadata
arrays one element at a time in Python, which took ~6 s on SmolLM2's 49152-token
vocabulary, and it trusts lengths read from the file.) Tensor data stays memory-mapped;
dequantisation uses the vectorised numpy kernels of the ``gguf`` package.

Shapes are reported in PyTorch order: GGUF lists dimensions innermost (contiguous) first,
so a GGUF tensor with dims ``[576, 1536]`` is a PyTorch ``[1536, 576]`` weight
(``out_features x in_features``). Tensors are returned exactly as stored; any
model-specific rearrangement (llama.cpp permutes LLaMA's Q/K rows for its RoPE layout)
is the business of the weight maps, not of this reader.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from lmarch.errors import LmarchError

__all__ = ["GGML_TYPES", "GGUFFile", "GGUFTensorInfo", "read_gguf", "unpack_nibbles"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Smallest possible encodings, used to reject counts the file cannot possibly hold:
# a key/value is key length (8) + key (>= 0) + value type (4) + value (>= 1 byte);
# a tensor info is name length (8) + name + n_dims (4) + dims + type (4) + offset (8).
MIN_KV_BYTES = 13
MIN_TENSOR_INFO_BYTES = 24
# Metadata arrays become Python lists; the largest real ones (vocabularies) hold a few
# hundred thousand entries, so anything past this is refused rather than materialised.
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_NESTING = 4

# GGUF metadata value types (spec: gguf_metadata_value_type) -> struct format.
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",  # UINT8
    1: "<b",  # INT8
    2: "<H",  # UINT16
    3: "<h",  # INT16
    4: "<I",  # UINT32
    5: "<i",  # INT32
    6: "<f",  # FLOAT32
    7: "<?",  # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_NUMPY_DTYPES: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",  # bool: one byte, converted below
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_VALUE_TYPE_NAMES = {
    0: "UINT8",
    1: "INT8",
    2: "UINT16",
    3: "INT16",
    4: "UINT32",
    5: "INT32",
    6: "FLOAT32",
    7: "BOOL",
    8: "STRING",
    9: "ARRAY",
    10: "UINT64",
    11: "INT64",
    12: "FLOAT64",
}

# ggml types stored as plain little-endian numbers: name -> numpy dtype.
_PLAIN_DTYPES: dict[str, str] = {
    "F32": "<f4",
    "F16": "<f2",
    "F64": "<f8",
    "I8": "<i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
}

# ggml type code -> (name, elements a block, bytes a block) for the types lmarch reads itself:
# parsing a file then needs no import of the gguf package (~0.15 s, most of a small model's
# load in a fresh process). Other codes are looked up in the package's own tables.
# tests/weights/test_gguf_types.py checks this table against the package's.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    20: ("IQ4_NL", 32, 18),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}

# Exceptions that malformed input can provoke inside the parser or the gguf package.
_PARSE_ERRORS = (
    ValueError,  # includes UnicodeDecodeError
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    OverflowError,
    MemoryError,
    RecursionError,
    BufferError,
    ArithmeticError,
    AssertionError,
    NotImplementedError,
)


# Blocks per slice in the fast dequantisers below: a slice's output (8 MiB) stays
# cache-friendly and temporaries stay small.
_DEQUANT_CHUNK = 1 << 16


def unpack_nibbles(packed: Any, *, interleaved: bool = False, out: Any = None) -> Any:
    """Two 4-bit codes a byte -> one code an element, [..., n] -> [..., 2n]: the one nibble
    unpacker of lmarch (numpy arrays and torch tensors alike).

    GGUF's block layout (the default): byte i holds code i in its low nibble and code i + n in
    its high nibble. ``interleaved``: byte i holds codes 2i (low) and 2i + 1 (high), PyTorch's
    int4 packing. ``out`` (optional, [..., 2n], any numeric dtype) receives the codes in place.
    """
    n = packed.shape[-1]
    if out is None:
        shape = (*packed.shape[:-1], 2 * n)
        numpy_in = isinstance(packed, np.ndarray)
        out = np.empty(shape, packed.dtype) if numpy_in else packed.new_empty(shape)
    low, high = (out[..., 0::2], out[..., 1::2]) if interleaved else (out[..., :n], out[..., n:])
    if isinstance(out, np.ndarray):
        np.bitwise_and(packed, 15, out=low, casting="unsafe")
        np.right_shift(packed, 4, out=high, casting="unsafe")
    else:
        low.copy_(packed & 15)
        high.copy_(packed >> 4)
    return out


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0: 34-byte blocks of (float16 scale d, 32 x int8 q); x = d * q."""
    blocks = raw.reshape(-1, 34)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for s in range(0, blocks.shape[0], _DEQUANT_CHUNK):
        b, o = blocks[s : s + _DEQUANT_CHUNK], out[s : s + _DEQUANT_CHUNK]
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        o[:] = b[:, 2:].view(np.int8)
        o *= d
    return out


def _dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0: 18-byte blocks of (float16 d, 16 bytes of 4-bit q); x = d * (q - 8).

    Low nibbles hold elements 0..15, high nibbles elements 16..31.
    """
    blocks = raw.reshape(-1, 18)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for s in range(0, blocks.shape[0], _DEQUANT_CHUNK):
        b, o = blocks[s : s + _DEQUANT_CHUNK], out[s : s + _DEQUANT_CHUNK]
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        unpack_nibbles(b[:, 2:], out=o)
        o -= 8
        o *= d
    return out


def _dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1: 20-byte blocks of (float16 d, float16 m, 16 bytes of 4-bit q); x = d * q + m.

    Low nibbles hold elements 0..15, high nibbles elements 16..31.
    """
    blocks = raw.reshape(-1, 20)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for s in range(0, blocks.shape[0], _DEQUANT_CHUNK):
        b, o = blocks[s : s + _DEQUANT_CHUNK], out[s : s + _DEQUANT_CHUNK]
        dm = b[:, :4].copy().view("<f2").astype(np.float32)
        unpack_nibbles(b[:, 4:], out=o)
        o *= dm[:, :1]
        o += dm[:, 1:]
    return out


# Whole-tensor numpy versions of the most common formats; bit-identical to the gguf
# package's kernels (same float32 operations in the same order) but several times faster,
# as those work through 16 rows per Python call.
_FAST_DEQUANT = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1}


def _fast_dequantizer(type_name: str) -> Any:
    """The whole-tensor numpy dequantiser of ``type_name``: those above, or the K-quants,
    Q5_0, Q5_1 and IQ4_NL of :mod:`lmarch.weights.gguf_kquants` (imported late: it uses this
    module's nibble unpacker); None for types left to ``gguf.quants.dequantize``."""
    if type_name in _FAST_DEQUANT:
        return _FAST_DEQUANT[type_name]
    from lmarch.weights.gguf_kquants import dequantizer

    return dequantizer(type_name)


class _Malformed(Exception):
    """Raised by the parser with a message saying what is wrong; wrapped into LmarchError."""


def _close_quietly(buf: mmap.mmap) -> None:
    """Close a mapping unless numpy views still use it (then it goes with the last one)."""
    with contextlib.suppress(BufferError):
        buf.close()


def _gguf_package() -> ModuleType:
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a dependency
        raise LmarchError(
            "reading GGUF files needs the 'gguf' package", hint="pip install gguf"
        ) from err
    return gguf


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in a GGUF file and how it is encoded.

    ``shape`` is in PyTorch order (outermost first); ``gguf_dims`` is the order stored in
    the file (innermost first), i.e. ``shape == tuple(reversed(gguf_dims))``.
    ``type_name`` is the ggml type ("F32", "Q4_1", "Q6_K", ...), ``nbytes`` the size of
    the stored data and ``offset`` its absolute position in the file.
    """

    name: str
    shape: tuple[int, ...]
    type_name: str
    nbytes: int
    offset: int
    gguf_dims: tuple[int, ...]
    type_code: int
    block_size: int
    block_bytes: int

    @property
    def numel(self) -> int:
        """Number of elements once dequantised."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes per innermost row (``shape[-1]`` elements, a whole number of blocks)."""
        return self.shape[-1] // self.block_size * self.block_bytes


_U64 = struct.Struct("<Q")


class _Parser:
    """A cursor over the mapped file that checks every read against the file's end."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.remaining():
            raise _Malformed(
                f"{what} at byte {self.pos} needs {n} bytes but only "
                f"{self.remaining()} remain (file truncated or corrupt)"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Malformed(f"{what} is not valid UTF-8 ({err.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise _Malformed(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise _Malformed(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        itype = self.scalar("<I", f"element type of {what}")
        count = self.scalar("<Q", f"length of {what}")
        if itype in _NUMPY_DTYPES:
            min_item = struct.calcsize(_SCALAR_FORMATS[itype])
        elif itype == _STRING:
            min_item = 8  # the length prefix
        elif itype == _ARRAY:
            min_item = 12  # element type + length
        else:
            raise _Malformed(f"{what} is an array of unknown value type {itype}")
        if count > MAX_ARRAY_LEN:
            raise _Malformed(f"{what} claims {count} elements (limit {MAX_ARRAY_LEN})")
        if count * min_item > self.remaining():
            raise _Malformed(
                f"{what} claims {count} {_VALUE_TYPE_NAMES[itype]} elements, more than the "
                f"{self.remaining()} bytes left in the file can hold (file truncated or corrupt)"
            )
        if itype in _NUMPY_DTYPES:
            arr = np.frombuffer(self.buf, dtype=_NUMPY_DTYPES[itype], count=count, offset=self.pos)
            self.pos += count * min_item
            return (arr != 0).tolist() if itype == _BOOL else arr.tolist()
        if itype == _STRING:
            return self.strings(count, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` length-prefixed strings: the same checks as :meth:`string`, in one loop
        with local names (vocabularies hold ~10^5 of them; this halves a model's load time)."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (length,) = unpack(buf, pos)
            end = pos + 8 + length
            if end > size:
                self.pos = pos + 8
                self.need(length, f"{what}[{i}]")
            try:
                append(buf[pos + 8 : end].decode("utf-8"))
            except UnicodeDecodeError as err:
                raise _Malformed(f"{what}[{i}] is not valid UTF-8 ({err.reason})") from None
            pos = end
        self.pos = pos
        return out


def _ggml_type(type_code: int, tensor: str) -> tuple[str, int, int]:
    """(name, elements a block, bytes a block) of ggml type ``type_code`` (:data:`GGML_TYPES`,
    else the gguf package's tables); _Malformed for a code neither knows."""
    known = GGML_TYPES.get(type_code)
    if known is not None:
        return known
    gguf = _gguf_package()
    try:
        qtype = gguf.GGMLQuantizationType(type_code)
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Malformed(f"tensor {tensor!r} has unknown ggml type code {type_code}") from None
    return qtype.name, block_size, block_bytes


def _parse(buf: mmap.mmap, size: int) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    """Parse and validate everything but the tensor data; raise _Malformed on any problem."""
    p = _Parser(buf, size)
    if size < 24:
        raise _Malformed(f"too short for a GGUF header ({size} bytes, need at least 24)")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise _Malformed(f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    p.pos = 4
    version = p.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
            raise _Malformed("big-endian GGUF files are not supported")
        raise _Malformed(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = p.scalar("<Q", "tensor count")
    kv_count = p.scalar("<Q", "metadata key count")
    least = kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES
    if least > p.remaining():
        raise _Malformed(
            f"header claims {tensor_count} tensors and {kv_count} metadata keys, which need "
            f"at least {least} bytes, but the file has only {p.remaining()} after the header "
            "(file truncated or corrupt)"
        )

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(kv_count):
        key = p.string(f"metadata key #{i}")
        vtype = p.scalar("<I", f"value type of {key!r}")
        if key in metadata:
            raise _Malformed(f"metadata key {key!r} appears twice")
        metadata[key] = p.value(vtype, f"metadata {key!r}")
        value_types[key] = vtype

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and value_types["general.alignment"] != 4:
        raise _Malformed("general.alignment must be a UINT32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Malformed(f"general.alignment {alignment} is not a power of two")

    pending: list[tuple[str, tuple[int, ...], int, int]] = []
    names: set[str] = set()
    for i in range(tensor_count):
        name = p.string(f"name of tensor #{i}")
        if name in names:
            raise _Malformed(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = p.scalar("<I", f"number of dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dims (must be 1..{MAX_DIMS})")
        p.need(8 * n_dims, f"dims of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, p.pos)
        p.pos += 8 * n_dims
        type_code = p.scalar("<I", f"type of tensor {name!r}")
        rel_offset = p.scalar("<Q", f"data offset of tensor {name!r}")
        pending.append((name, dims, type_code, rel_offset))

    data_start = -(-p.pos // alignment) * alignment
    data_size = size - data_start
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_code, rel_offset in pending:
        type_name, block_size, block_bytes = _ggml_type(type_code, name)
        if min(dims) < 1:
            raise _Malformed(f"tensor {name!r} has a non-positive dimension in {list(dims)}")
        if dims[0] % block_size:
            raise _Malformed(
                f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                f"{type_name} block size {block_size}"
            )
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block_size * block_bytes
        if rel_offset % alignment:
            raise _Malformed(
                f"tensor {name!r}: data offset {rel_offset} is not a multiple of the "
                f"alignment {alignment}"
            )
        if rel_offset + nbytes > data_size:
            raise _Malformed(
                f"tensor {name!r} ({type_name}, dims {list(dims)}, {nbytes} bytes at data "
                f"offset {rel_offset}) runs past the end of the file ({data_size} data bytes; "
                "file truncated or corrupt)"
            )
        tensors[name] = GGUFTensorInfo(
            name=name,
            shape=tuple(reversed(dims)),
            type_name=type_name,
            nbytes=nbytes,
            offset=data_start + rel_offset,
            gguf_dims=tuple(dims),
            type_code=type_code,
            block_size=block_size,
            block_bytes=block_bytes,
        )
    return metadata, tensors


class GGUFFile:
    """An open GGUF file: its metadata, its tensor table, and memory-mapped tensor data.

    Made by :func:`read_gguf`. ``metadata`` maps keys to plain Python values (str, int,
    float, bool, or lists of them). Tensors are read on demand with :meth:`load`
    (dequantised) or :meth:`raw` (the stored bytes). Usable as a context manager; the
    mapping is also released when the object and every array from :meth:`raw` are gone.
    """

    def __init__(
        self,
        path: Path,
        buf: mmap.mmap,
        metadata: dict[str, Any],
        tensors: dict[str, GGUFTensorInfo],
    ) -> None:
        self.path = path
        self.metadata = metadata
        self._tensors = tensors
        self._buf: mmap.mmap | None = buf
        # Read-only uint8 view of the whole file; slices of it are zero-copy.
        self._bytes = np.frombuffer(buf, dtype=np.uint8)

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture", "?")
        return f"GGUFFile({str(self.path)!r}, architecture={arch!r}, tensors={len(self)})"

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (it stays alive while arrays returned by :meth:`raw` exist)."""
        buf, self._buf = self._buf, None
        self._bytes = np.empty(0, dtype=np.uint8)
        if buf is not None:
            _close_quietly(buf)

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """Shape (PyTorch order), ggml type name, byte size and offset of tensor ``name``."""
        try:
            return self._tensors[name]
        except KeyError:
            raise LmarchError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> tuple[np.ndarray, str, tuple[int, ...]]:
        """The stored bytes of ``name``, unconverted, for repacking into other kernels.

        Returns ``(data, type_name, shape)``: ``data`` is a read-only uint8 view of the
        memory-mapped file shaped ``(*shape[:-1], row_bytes)`` (each row a whole number of
        blocks), ``shape`` the logical PyTorch shape of the tensor.
        """
        info = self.tensor_info(name)
        if self._buf is None:
            raise LmarchError(f"{self.path}: file is closed")
        flat = self._bytes[info.offset : info.offset + info.nbytes]
        return flat.reshape(*info.shape[:-1], info.row_bytes), info.type_name, info.shape

    def release(self, name: str, start: int = 0, end: int | None = None) -> None:
        """Let the pages of bytes ``start:end`` of ``name`` (all of it by default) that
        :meth:`raw` read leave this process's resident memory once they are copied out
        (read again, they come back from the file): a loader that copies tensor by tensor
        then peaks near the size of what it keeps, not that plus the whole file."""
        info = self.tensor_info(name)
        if self._buf is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = (info.offset + start) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages
        last = info.offset + (info.nbytes if end is None else min(end, info.nbytes))
        if last > first:
            self._buf.madvise(mmap.MADV_DONTNEED, first, last - first)

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` dequantised to a new ``dtype`` tensor of shape ``info.shape``.

        Plain types (F32, F16, BF16, F64, I8..I64) are converted directly; block-quantised
        types go through vectorised numpy (our own whole-tensor kernels for Q8_0, Q4_0,
        Q4_1, the K-quants, Q5_0, Q5_1 and IQ4_NL; ``gguf.quants.dequantize`` for the rest), which yields float32. The result owns its memory (it is not a view of the file).
        """
        data, type_name, shape = self.raw(name)
        if type_name == "BF16":
            bits = torch.from_numpy(np.array(data).view("<i2"))
            return bits.view(torch.bfloat16).reshape(shape).to(dtype)
        if type_name in _PLAIN_DTYPES:
            values = np.array(data).view(_PLAIN_DTYPES[type_name]).reshape(shape)
            return torch.from_numpy(values).to(dtype)
        fast = _fast_dequantizer(type_name)
        if fast is not None:
            if dtype == torch.float32 or len(shape) < 2:
                values = fast(data)
                return torch.from_numpy(values.reshape(shape)).to(dtype)
            # narrower targets (bf16 embeddings): convert a block of rows at a time, so the
            # whole float32 tensor never exists
            out = torch.empty(shape, dtype=dtype)
            rows, flat = data.reshape(-1, data.shape[-1]), out.view(-1, shape[-1])
            step = max(1, (1 << 22) // shape[-1])
            for start in range(0, rows.shape[0], step):
                block = fast(rows[start : start + step])
                flat[start : start + step] = torch.from_numpy(block.reshape(-1, shape[-1]))
            return out
        gguf = _gguf_package()
        qtype = gguf.GGMLQuantizationType[type_name]
        try:
            values = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise LmarchError(
                f"{self.path}: tensor {name!r} has type {type_name}, which cannot be "
                "dequantised (not supported by the installed gguf package)",
                hint="upgrade the gguf package, or re-quantise the model to a common type",
            ) from None
        except _PARSE_ERRORS as err:
            raise LmarchError(
                f"{self.path}: cannot dequantise tensor {name!r} ({type_name}): "
                f"{type(err).__name__}: {err}"
            ) from None
        return torch.from_numpy(values.reshape(shape)).to(dtype)

    def load_all(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor, dequantised, by name (see :meth:`load`)."""
        return {name: self.load(name, dtype) for name in self._tensors}


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate the GGUF file at ``path``; tensor data is memory-mapped, not read.

    Raises :class:`LmarchError` naming the file for a missing file, a file that is not
    GGUF, an unsupported version, and any structural damage (truncation, lengths or
    counts the file cannot hold, tensors whose data lies outside the file).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LmarchError(f"{path}: no such file") from None
    except OSError as err:
        raise LmarchError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise LmarchError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise LmarchError(f"{path}: file is empty, not a GGUF file")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise LmarchError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        metadata, tensors = _parse(buf, len(buf))
    except _Malformed as err:
        _close_quietly(buf)
        raise LmarchError(f"{path}: {err}") from None
    except _PARSE_ERRORS as err:
        _close_quietly(buf)
        raise LmarchError(f"{path}: malformed GGUF file ({type(err).__name__}: {err})") from None
    return GGUFFile(path, buf, metadata, tensors)
