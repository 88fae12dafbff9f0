"""Dequantisers for GGUF's K-quants (Q2_K .. Q6_K) and the other 32-element block formats
(Q5_0, Q5_1, IQ4_NL), written out in numpy.

Each function takes a tensor's stored bytes (uint8, any shape whose last axis holds whole
blocks) and returns float32 ``[n_blocks, block_size]``, bit for bit what
``gguf.quants.dequantize`` returns: the same float32 operations in the same order (every
product of a float16 scale with a small integer is exact in float32, so only the last
addition or multiplication rounds, as it does there). They work through the whole tensor
in slices of ``_CHUNK`` blocks instead of the gguf package's 16 rows a Python call.

K-quants (llama.cpp's ``ggml-common.h``, "k-quants" by Iwan Kawrakow, 2023) cut a row into
super-blocks of 256 weights, each split into sub-blocks of 16 or 32 with their own small
integer scale (and minimum); the scales are themselves quantised against one or two float16
numbers per super-block. Bytes of one super-block, in file order:

    Q2_K  (84 B, 2.625 bits)   scales[16]  qs[64]  d  dmin
          16 sub-blocks of 16; scale byte j: low nibble sc_j, high nibble m_j;
          w = d sc_j q - dmin m_j, q in 0..3
    Q3_K  (110 B, 3.4375 bits) hmask[32]  qs[64]  scales[12]  d
          16 sub-blocks of 16; 6-bit signed scales sc_j - 32; q = low 2 bits (qs) minus 4
          unless the hmask bit is set: q in -4..3; w = d (sc_j - 32) q
    Q4_K  (144 B, 4.5 bits)    d  dmin  scales[12]  qs[128]
          8 sub-blocks of 32; 6-bit scales sc_j and mins m_j packed in 12 bytes;
          w = d sc_j q - dmin m_j, q in 0..15
    Q5_K  (176 B, 5.5 bits)    d  dmin  scales[12]  qh[32]  qs[128]
          as Q4_K with a fifth bit from qh: q in 0..31
    Q6_K  (210 B, 6.5625 bits) ql[128]  qh[64]  scales[16] (int8)  d
          16 sub-blocks of 16; q = 4 low bits (ql) | 2 high bits (qh) << 4, minus 32;
          w = d sc_j q

Inside a super-block the codes are laid out in runs of 32 bytes: for 4-bit codes, the low
nibbles of 32 bytes hold one run of 32 weights and their high nibbles the next run; 2-bit
codes take four runs from bits 0-1, 2-3, 4-5 and 6-7 of the same 32 bytes; a high-bit plane
``qh`` / ``hmask`` gives bit j of byte i to weight i of run j.

The 12 scale bytes of Q4_K / Q5_K hold eight 6-bit scales (A..H) and eight 6-bit mins
(a..h); two top bits each are parked in the top of bytes 0-7:

    bytes 0-3   top2(E..H) | A..D          bytes 4-7   top2(e..h) | a..d
    bytes 8-11  low4(e..h) << 4 | low4(E..H)

(Q3_K packs its sixteen 6-bit scales the same way: low nibbles in bytes 0-7, two high bits
each in bytes 8-11.)

The 32-element formats:

    Q5_0   (22 B)  d  qh (uint32: bit i = fifth bit of weight i)  qs[16]; w = d (q - 16)
    Q5_1   (24 B)  d  m  qh  qs[16];                                  w = d q + m
    IQ4_NL (18 B)  d  qs[16];  w = d K[q], K a fixed non-uniform 16-entry table (int8)

with, as in Q4_0, the low nibbles of qs holding weights 0..15 and the high nibbles 16..31.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lmarch.weights.gguf import unpack_nibbles

QK_K = 256  # weights per super-block
# Blocks per slice: the slice's float32 output is a few MiB, temporaries stay small.
_CHUNK = 1 << 13
# IQ4_NL's code book (llama.cpp kvalues_iq4nl).
IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)
_TWO_BIT_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)

# type name -> (weights, bytes) per block
BLOCK_SHAPES: dict[str, tuple[int, int]] = {
    "Q2_K": (QK_K, 84),
    "Q3_K": (QK_K, 110),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "IQ4_NL": (32, 18),
}


def _halves(b: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes ``start, start+1`` of each block, as float32 [n, 1]."""
    return b[:, start : start + 2].copy().view("<f2").astype(np.float32)


def _two_bit_runs(qs: np.ndarray) -> np.ndarray:
    """[n, 32 g] bytes -> [n, 128 g] 2-bit codes: per 32 bytes, four runs of 32 weights from
    bits 0-1, 2-3, 4-5, 6-7."""
    n = qs.shape[0]
    runs = (qs.reshape(n, -1, 1, 32) >> _TWO_BIT_SHIFTS) & np.uint8(3)
    return runs.reshape(n, -1)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """[n, 32] bytes -> [n, 8, 32] bits: plane j holds bit j of each byte."""
    planes = np.unpackbits(bits, axis=-1, bitorder="little").reshape(bits.shape[0], 32, 8)
    return planes.transpose(0, 2, 1)


def k4_scales_and_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and eight 6-bit mins of a Q4_K / Q5_K super-block from its 12
    packed bytes ([n, 12] -> two uint8 [n, 8]; layout in the module docstring)."""
    d, m, low = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    nibbles = unpack_nibbles(low)  # [n, 8]: low4 of E..H, then low4 of e..h
    top = np.uint8(0x30)
    sc = np.concatenate([d & np.uint8(63), nibbles[:, :4] | ((d >> np.uint8(2)) & top)], axis=-1)
    mn = np.concatenate([m & np.uint8(63), nibbles[:, 4:] | ((m >> np.uint8(2)) & top)], axis=-1)
    return sc, mn


def _q2_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    sc_m = unpack_nibbles(b[:, :16]).astype(np.float32)  # [n, 32]: 16 scales, then 16 mins
    dl = (_halves(b, 80) * sc_m[:, :16])[..., None]
    ml = (_halves(b, 82) * sc_m[:, 16:])[..., None]
    o = out.reshape(n, 16, 16)
    o[:] = _two_bit_runs(b[:, 16:80]).reshape(n, 16, 16)
    o *= dl
    o -= ml


def _q3_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    packed = b[:, 96:108]
    low = unpack_nibbles(packed[:, :8])  # [n, 16] low four bits of scales 0..15
    high = (packed[:, 8:12].reshape(n, 1, 4) >> _TWO_BIT_SHIFTS[0]) & np.uint8(3)  # [n, 4, 4]
    sc = (low | (high.reshape(n, 16) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = (_halves(b, 108) * sc.astype(np.float32))[..., None]
    low2 = _two_bit_runs(b[:, 32:96]).astype(np.int8)
    missing = (_bit_planes(b[:, :32]).reshape(n, QK_K) ^ np.uint8(1)) << np.uint8(2)
    o = out.reshape(n, 16, 16)
    o[:] = (low2 - missing.astype(np.int8)).reshape(n, 16, 16)
    o *= dl


def _k4_constants(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block d sc_j and dmin m_j of Q4_K / Q5_K blocks, float32 [n, 8, 1] each."""
    sc, mn = k4_scales_and_mins(b[:, 4:16])
    return (
        (_halves(b, 0) * sc.astype(np.float32))[..., None],
        (_halves(b, 2) * mn.astype(np.float32))[..., None],
    )


def _q4_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    d, dm = _k4_constants(b)
    o = out.reshape(n, 8, 32)
    unpack_nibbles(b[:, 16:].reshape(n, 4, 32), out=o.reshape(n, 4, 64))
    o *= d
    o -= dm


def _q5_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    d, dm = _k4_constants(b)
    low = unpack_nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    o = out.reshape(n, 8, 32)
    o[:] = low | (_bit_planes(b[:, 16:48]) << np.uint8(4))
    o *= d
    o -= dm


def _q6_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    low = unpack_nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, QK_K)
    high = _two_bit_runs(b[:, 128:192])
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    d = (_halves(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32))[..., None]
    o = out.reshape(n, 16, 16)
    o[:] = q.reshape(n, 16, 16)
    o *= d


def _five_bit_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 codes 0..31 [n, 32] from the fifth-bit word qh [n, 4] and nibbles qs [n, 16]."""
    return unpack_nibbles(qs) | (np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4))


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    q = _five_bit_codes(b[:, 2:6], b[:, 6:]).astype(np.int8) - np.int8(16)
    out[:] = q
    out *= _halves(b, 0)


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = _five_bit_codes(b[:, 4:8], b[:, 8:])
    out *= _halves(b, 0)
    out += _halves(b, 2)


def _iq4_nl(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = IQ4_NL_VALUES[unpack_nibbles(b[:, 2:])]
    out *= _halves(b, 0)


_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "IQ4_NL": _iq4_nl,
}


def dequantize_blocks(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Stored bytes of ``type_name`` blocks -> float32 [n_blocks, block_size], exactly as
    ``gguf.quants.dequantize`` (see the module docstring for each layout)."""
    size, nbytes = BLOCK_SHAPES[type_name]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    out = np.empty((blocks.shape[0], size), dtype=np.float32)
    kernel = _KERNELS[type_name]
    for s in range(0, blocks.shape[0], _CHUNK):
        kernel(blocks[s : s + _CHUNK], out[s : s + _CHUNK])
    return out


def dequantizer(type_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """A one-argument dequantiser for ``type_name`` (None for types not written out here)."""
    if type_name not in _KERNELS:
        return None
    return lambda raw: dequantize_blocks(raw, type_name)


__all__ = [
    "BLOCK_SHAPES",
    "IQ4_NL_VALUES",
    "QK_K",
    "dequantize_blocks",
    "dequantizer",
    "k4_scales_and_mins",
]
