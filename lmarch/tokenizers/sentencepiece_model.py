"""Reading a SentencePiece ``.model`` file, and the normaliser it carries.

A ``.model`` file is one protocol-buffer message, ``ModelProto`` (sentencepiece's
``sentencepiece_model.proto``). It is read here from the wire format by hand, keeping only the
fields that change how text is encoded:

- ``pieces`` (field 1): each a ``piece`` string (1), a ``score`` float (2) and a ``type`` (3:
  1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte);
- ``trainer_spec`` (2): ``model_type`` (3; 1 is Unigram), ``vocab_size`` (4),
  ``treat_whitespace_as_suffix`` (24), ``byte_fallback`` (35), ``unk_surface`` (44);
- ``normalizer_spec`` (3): ``name`` (1), ``precompiled_charsmap`` (2), ``add_dummy_prefix`` (3),
  ``remove_extra_whitespaces`` (4), ``escape_whitespaces`` (5), each with the proto's default
  (true for the last three) when absent.

The precompiled charsmap is sentencepiece's normalisation table (``nmt_nfkc`` by default: NFKC
plus the removal of control characters and the mapping of every space-like character to a space).
It is a 4-byte little-endian size, a Darts double-array trie over UTF-8 byte strings of that many
bytes, then a pool of NUL-terminated replacement strings the trie's values point into.
:class:`CharsMap` walks the trie as sentencepiece's ``Normalizer::NormalizePrefix`` does: at each
position the longest matching rule wins; with no rule, one UTF-8 character is copied (a malformed
byte becomes U+FFFD and consumes one byte).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lmarch.errors import LmarchError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PIECE_TYPES = {
    "normal": NORMAL,
    "unknown": UNKNOWN,
    "control": CONTROL,
    "user_defined": USER_DEFINED,
    "unused": UNUSED,
    "byte": BYTE,
}
_REPLACEMENT = "\ufffd".encode()
_MAX_TRIE_RESULTS = 32  # sentencepiece keeps at most this many prefix matches per position


class _WireError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of each field of one protobuf message: an int for
    varint, 32- and 64-bit fields (the raw bits), bytes for length-delimited ones."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _WireError("truncated 64-bit field")
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _WireError("a length-delimited field runs past the end")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _WireError("truncated 32-bit field")
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise _WireError(f"wire type {wire} (groups are not used by ModelProto)")
        out.append((number, wire, value))
    return out


def _int32(value: int) -> int:
    """A varint holding a (possibly negative) int32."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _float32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@dataclass
class SentencePieceModel:
    """What lmarch reads from a SentencePiece ``ModelProto`` (see the module docstring).

    ``pieces`` holds ``(piece, score, type)`` in id order, types as the proto numbers them.
    """

    pieces: list[tuple[str, float, int]]
    model_type: int = 1
    vocab_size: int = 8000
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    unknown_fields: list[int] = field(default_factory=list)


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise _WireError("a string field is not length-delimited")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _WireError(f"a string field is not UTF-8 ({exc})") from None


def _check_wire(wire: int, expected: int, what: str) -> None:
    if wire != expected:
        raise _WireError(f"{what} has wire type {wire}, expected {expected}")


def parse_model_proto(data: bytes) -> SentencePieceModel:
    """The :class:`SentencePieceModel` in serialised ``ModelProto`` bytes; ``ValueError`` if the
    bytes are not one."""
    model = SentencePieceModel(pieces=[])
    for number, wire, value in _fields(data):
        if number == 1:
            _check_wire(wire, 2, "a piece")
            piece, score, kind = None, 0.0, NORMAL
            for n, w, v in _fields(value):  # type: ignore[arg-type]
                if n == 1:
                    piece = _text(v)
                elif n == 2:
                    _check_wire(w, 5, "a piece's score")
                    score = _float32(v)  # type: ignore[arg-type]
                elif n == 3:
                    _check_wire(w, 0, "a piece's type")
                    kind = v  # type: ignore[assignment]
            if piece is None or kind not in PIECE_TYPES.values():
                raise _WireError(f"piece {len(model.pieces)} has no text or an unknown type")
            model.pieces.append((piece, score, kind))  # type: ignore[arg-type]
        elif number == 2:
            _check_wire(wire, 2, "trainer_spec")
            for n, w, v in _fields(value):  # type: ignore[arg-type]
                if n == 3 and w == 0:
                    model.model_type = int(v)
                elif n == 4 and w == 0:
                    model.vocab_size = _int32(v)  # type: ignore[arg-type]
                elif n == 24 and w == 0:
                    model.treat_whitespace_as_suffix = bool(v)
                elif n == 35 and w == 0:
                    model.byte_fallback = bool(v)
                elif n == 44:
                    model.unk_surface = _text(v)
        elif number == 3:
            _check_wire(wire, 2, "normalizer_spec")
            for n, w, v in _fields(value):  # type: ignore[arg-type]
                if n == 1:
                    model.normalizer_name = _text(v)
                elif n == 2:
                    _check_wire(w, 2, "precompiled_charsmap")
                    model.precompiled_charsmap = bytes(v)  # type: ignore[arg-type]
                elif n in (3, 4, 5) and w == 0:
                    name = {
                        3: "add_dummy_prefix",
                        4: "remove_extra_whitespaces",
                        5: "escape_whitespaces",
                    }[n]
                    setattr(model, name, bool(v))
        elif number in (4, 5):
            _check_wire(wire, 2, "self_test_data / denormalizer_spec")
        else:
            model.unknown_fields.append(number)
    return model


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Read and check a ``.model`` file: a Unigram model with an unknown piece and distinct
    pieces. Anything else raises one :class:`LmarchError` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc
    what = f"{path} is not a sentencepiece model"
    try:
        model = parse_model_proto(data)
    except (_WireError, ValueError) as exc:
        raise LmarchError(f"{what} ({exc})") from None
    if not model.pieces:
        raise LmarchError(f"{what} (no pieces)")
    if model.unknown_fields:
        raise LmarchError(f"{what} (unexpected top-level fields {sorted(model.unknown_fields)})")
    if model.model_type != 1:
        kinds = {2: "BPE", 3: "word", 4: "char"}
        raise LmarchError(
            f"{path} is a sentencepiece {kinds.get(model.model_type, '?')} model; "
            "only Unigram models are read"
        )
    if model.precompiled_charsmap:
        try:
            CharsMap(model.precompiled_charsmap)
        except ValueError as exc:
            raise LmarchError(f"{what} (bad precompiled_charsmap: {exc})") from None
    return model


class CharsMap:
    """sentencepiece's precompiled normalisation rules (see the module docstring).

    :meth:`normalize_prefix` gives the replacement of the longest rule matching at a position
    of UTF-8 bytes, as ``Normalizer::NormalizePrefix`` does.
    """

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 4:
            raise ValueError("shorter than its size header")
        (trie_size,) = struct.unpack("<I", blob[:4])
        if trie_size % 4 or trie_size + 4 > len(blob) or trie_size == 0:
            raise ValueError(f"trie size {trie_size} does not fit {len(blob)} bytes")
        self.blob = blob
        self.units = struct.unpack(f"<{trie_size // 4}I", blob[4 : 4 + trie_size])
        self.pool = blob[4 + trie_size :]
        self._cache: dict[int, bytes] = {}
        # bytes that begin at least one rule: everything else is copied through quickly
        root = self.units[0]
        base = self._offset(root)
        self.start_bytes = frozenset(
            b
            for b in range(256)
            if (base ^ b) < len(self.units) and self._label(self.units[base ^ b]) == b
        )

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    @staticmethod
    def _label(unit: int) -> int:
        return unit & ((1 << 31) | 0xFF)

    def _replacement(self, offset: int) -> bytes:
        out = self._cache.get(offset)
        if out is None:
            end = self.pool.find(b"\0", offset)
            out = self.pool[offset : end if end >= 0 else len(self.pool)]
            self._cache[offset] = out
        return out

    def longest_match(self, data: bytes, pos: int) -> tuple[int, int]:
        """``(length, value)`` of the longest rule matching ``data`` at ``pos`` (Darts'
        ``commonPrefixSearch``, first 32 results); ``(0, 0)`` when none does."""
        units, n = self.units, len(self.units)
        node = self._offset(units[0])
        best_len = best_val = found = 0
        for i in range(pos, len(data)):
            byte = data[i]
            node ^= byte
            if node >= n:
                break
            unit = units[node]
            if self._label(unit) != byte:
                break
            node ^= self._offset(unit)
            if node >= n:  # only a corrupt table points outside itself
                break
            if (unit >> 8) & 1:  # has a leaf: a rule ends here
                if found < _MAX_TRIE_RESULTS:
                    best_len, best_val = i + 1 - pos, units[node] & 0x7FFFFFFF
                found += 1
        return best_len, best_val

    def normalize_prefix(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """``(replacement, bytes consumed)`` at ``pos``."""
        length, value = self.longest_match(data, pos)
        if length:
            return self._replacement(value), length
        return copy_one_char(data, pos)


def utf8_char_length(data: bytes, pos: int) -> int:
    """Length of the valid UTF-8 character at ``pos``, or 0 if the bytes there are malformed
    (sentencepiece's ``IsValidDecodeUTF8``)."""
    b0 = data[pos]
    if b0 < 0x80:
        return 1
    n = len(data) - pos

    def cont(k: int) -> bool:
        return 0x80 <= data[pos + k] <= 0xBF

    if 0xC2 <= b0 <= 0xDF and n >= 2 and cont(1):
        return 2
    if 0xE0 <= b0 <= 0xEF and n >= 3 and cont(1) and cont(2):
        code = ((b0 & 0x0F) << 12) | ((data[pos + 1] & 0x3F) << 6) | (data[pos + 2] & 0x3F)
        if code >= 0x800 and not 0xD800 <= code <= 0xDFFF:
            return 3
        return 0
    if 0xF0 <= b0 <= 0xF4 and n >= 4 and cont(1) and cont(2) and cont(3):
        code = (
            ((b0 & 0x07) << 18)
            | ((data[pos + 1] & 0x3F) << 12)
            | ((data[pos + 2] & 0x3F) << 6)
            | (data[pos + 3] & 0x3F)
        )
        if 0x10000 <= code <= 0x10FFFF:
            return 4
    return 0


def copy_one_char(data: bytes, pos: int) -> tuple[bytes, int]:
    """One UTF-8 character copied through, or U+FFFD for one malformed byte."""
    length = utf8_char_length(data, pos)
    if length == 0:
        return _REPLACEMENT, 1
    return data[pos : pos + length], length


def plain_run_pattern(excluded: set[int]) -> re.Pattern[bytes]:
    """A pattern for a run of ASCII bytes other than the space and ``excluded``: bytes that no
    rule, user-defined symbol or whitespace step touches, copied through in one step."""
    keep = [b for b in range(0x80) if b != 0x20 and b not in excluded]
    if not keep:
        return re.compile(b"(?!)")
    cls = b"".join(re.escape(bytes([b])) for b in keep)
    return re.compile(b"[" + cls + b"]+")


__all__ = [
    "BYTE",
    "CONTROL",
    "NORMAL",
    "PIECE_TYPES",
    "UNKNOWN",
    "UNUSED",
    "USER_DEFINED",
    "CharsMap",
    "SentencePieceModel",
    "copy_one_char",
    "parse_model_proto",
    "read_sentencepiece_model",
    "utf8_char_length",
]
