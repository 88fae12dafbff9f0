"""Block-quantised linear layers in llama.cpp's GGUF formats, with lmarch's own CPU kernels.

A weight row is cut into blocks of 32 inputs; each block keeps its own constants in float16:

    Q4_1 (4.5 + 0.5 bits a weight):  w~_i = d q_i + m,  q_i in 0..15,
                                     d = (max - min) / 15,  m = min,  q_i = round((w_i - m) / d)
    Q8_0 (8.5 bits a weight):        w~_i = d q_i,      q_i in -127..127,
                                     d = max|w| / 127,  q_i = round(w_i / d)

so a GGUF file's blocks load bit for bit, and any float model can be quantised the same way.
On the CPU the product runs in ``native/blockq.c``: the input row is quantised per block to
16-bit integers (x~_i = e p_i, e = max|x| / 32767), and each block contributes

    d e sum_i q_i p_i + m sum_i x_i

— integer dot products, as in llama.cpp, which uses 8-bit activations. With 16 bits the
rounding moves each output by ~1e-5 of its size: SmolLM2 in Q4_1 predicts the same top token
as its float32 dequantisation at every one of 400 teacher-forced positions (8-bit activations:
91%). Elsewhere (GPU, training, no C compiler) the layers multiply by the dequantised weight
(which calls take the kernel: :func:`lmarch.native.policy.block_kernel_call`). A SwiGLU block or
a whole LLaMA layer over these layers runs as one native call once
:func:`lmarch.native.accelerate` has swapped in its native module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch import native
from lmarch.errors import LmarchError
from lmarch.native import QK
from lmarch.native.policy import block_kernel_call
from lmarch.weights.gguf import unpack_nibbles


def check_block_shape(in_features: int) -> None:
    """Raise ``LmarchError`` unless rows of ``in_features`` split into blocks of 32."""
    if in_features % QK:
        raise LmarchError(
            f"block formats need in_features divisible by {QK}, got {in_features}",
            hint="keep this layer in float",
        )


def _half_bits(x: Tensor) -> Tensor:
    """float -> float16 stored as int16 bits (so model-wide ``.float()`` leaves it alone)."""
    return x.to(torch.float16).view(torch.int16)


def _from_bits(bits: Tensor) -> Tensor:
    return bits.view(torch.float16).float()


def quantize_q4_1(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 of a [N, K] weight: codes uint8 [N, K] (0..15), d and m float32 [N, K/32], both
    already rounded to float16 (the codes are chosen for the rounded constants)."""
    n, k = weight.shape
    check_block_shape(k)
    w = weight.detach().float().reshape(n, k // QK, QK)
    lo, hi = w.amin(-1), w.amax(-1)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    step = torch.where(d > 0, d, torch.ones_like(d))  # a constant block: any step, codes 0
    q = torch.round((w - m[..., None]) / step[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), d, m


def quantize_q8_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Q8_0 of a [N, K] weight: codes int8 [N, K] (-127..127), d float32 [N, K/32] (float16
    values)."""
    n, k = weight.shape
    check_block_shape(k)
    w = weight.detach().float().reshape(n, k // QK, QK)
    d = (w.abs().amax(-1) / 127).half().float()
    step = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(w / step[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


def pack_q4(codes: Tensor) -> Tensor:
    """uint8 codes [N, K] (0..15) -> [N, K/2] in GGUF's block order: byte i of a block holds
    code i in its low nibble and code i + 16 in its high nibble."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n, k // QK, QK)
    return (blocks[..., : QK // 2] | (blocks[..., QK // 2 :] << 4)).reshape(n, k // 2)


def unpack_q4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_q4`."""
    n, half = packed.shape
    return unpack_nibbles(packed.reshape(n, half // (QK // 2), QK // 2)).reshape(n, half * 2)


class _BlockLinear(nn.Module):
    """Shared plumbing: shapes, bias, the kernel-or-fallback forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        check_block_shape(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.native = native.native_available()  # built (once per process) with the layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def dequantized_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _kernel(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """y = x W~^T + b: the native kernel on CPU inference, the dequantised weight otherwise."""
        if not (self.native and block_kernel_call(x)):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        lead = x.shape[:-1]
        y = self._kernel(x.reshape(-1, self.in_features))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)


class BlockQ4Linear(_BlockLinear):
    """``nn.Linear`` with a Q4_1 weight: buffers ``codes`` uint8 [out, in/2] (GGUF layout) and
    ``dm`` int16 [out, in/32, 2] holding the float16 bits of (d, m) per block."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device=None
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "dm",
            torch.zeros(out_features, in_features // QK, 2, dtype=torch.int16, device=device),
        )

    @classmethod
    def from_blocks(
        cls, packed: Tensor, dm_bits: Tensor, bias: Tensor | None = None
    ) -> BlockQ4Linear:
        """A layer holding GGUF Q4_1 data as is: ``packed`` uint8 [N, K/2], ``dm_bits`` int16
        [N, K/32, 2] (float16 bits of d and m)."""
        n, half = packed.shape
        layer = cls(half * 2, n, bias=bias is not None, device="meta")
        layer.codes = packed.contiguous()
        layer.dm = dm_bits.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        return layer

    @classmethod
    def from_codes(cls, codes: Tensor, d: Tensor, m: Tensor) -> BlockQ4Linear:
        """From unpacked codes uint8 [N, K] and per-block d, m [N, K/32] (rounded to float16)."""
        return cls.from_blocks(pack_q4(codes), _half_bits(torch.stack([d, m], dim=-1)))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BlockQ4Linear:
        """Quantise an ``nn.Linear`` to Q4_1 (:func:`quantize_q4_1`)."""
        codes, d, m = quantize_q4_1(linear.weight)
        layer = cls.from_codes(codes, d, m)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        return layer

    def dequantized_weight(self) -> Tensor:
        """W~ = d q + m, float32 [out, in]."""
        n, k = self.out_features, self.in_features
        dm = _from_bits(self.dm)
        q = unpack_q4(self.codes).float().reshape(n, k // QK, QK)
        return (q * dm[..., :1] + dm[..., 1:]).reshape(n, k)

    def _kernel(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return native.q4_1_matmul(x, self.codes, self.dm)
        return native.q4_1_matmul_eager(x, self.codes, self.dm)


class BlockQ8Linear(_BlockLinear):
    """``nn.Linear`` with a Q8_0 weight: buffers ``codes`` int8 [out, in] and ``d`` int16
    [out, in/32] holding the float16 bits of each block's scale."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device=None
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "d", torch.zeros(out_features, in_features // QK, dtype=torch.int16, device=device)
        )

    @classmethod
    def from_blocks(
        cls, codes: Tensor, d_bits: Tensor, bias: Tensor | None = None
    ) -> BlockQ8Linear:
        """A layer holding GGUF Q8_0 data as is: ``codes`` int8 [N, K], ``d_bits`` int16 [N, K/32]."""
        n, k = codes.shape
        layer = cls(k, n, bias=bias is not None, device="meta")
        layer.codes = codes.contiguous()
        layer.d = d_bits.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        return layer

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> BlockQ8Linear:
        """Quantise a [N, K] weight to Q8_0 (:func:`quantize_q8_0`)."""
        codes, d = quantize_q8_0(weight)
        return cls.from_blocks(codes, _half_bits(d), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BlockQ8Linear:
        """Quantise an ``nn.Linear`` to Q8_0."""
        return cls.from_weight(linear.weight, linear.bias)

    def dequantized_weight(self) -> Tensor:
        """W~ = d q, float32 [out, in]."""
        n, k = self.out_features, self.in_features
        q = self.codes.float().reshape(n, k // QK, QK)
        return (q * _from_bits(self.d)[..., None]).reshape(n, k)

    def _kernel(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return native.q8_0_matmul(x, self.codes, self.d)
        return native.q8_0_matmul_eager(x, self.codes, self.d)


class BlockQ8Embedding(nn.Module):
    """A token-embedding table kept in Q8_0 blocks: row i is d q for the codes and scales of
    row i. Built from a :class:`BlockQ8Linear` output head it shares that head's buffers, so a
    model whose head is tied to its embeddings (SmolLM2, stored as Q8_0 in llama.cpp's files)
    holds the table once, in 8.5 bits a weight, instead of adding a float32 copy."""

    def __init__(self, codes: Tensor, d_bits: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        check_block_shape(self.embedding_dim)
        self.register_buffer("codes", codes)
        self.register_buffer("d", d_bits)

    @classmethod
    def tied_to(cls, head: BlockQ8Linear) -> BlockQ8Embedding:
        """The embedding table that ``head``'s weight is (same storage)."""
        return cls(head.codes, head.d)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [...] -> float32 rows [..., D], exactly d q."""
        q = self.codes[ids].float().unflatten(-1, (self.embedding_dim // QK, QK))
        return (q * _from_bits(self.d[ids])[..., None]).flatten(-2)


__all__ = [
    "BlockQ8Embedding",
    "BlockQ4Linear",
    "BlockQ8Linear",
    "check_block_shape",
    "pack_q4",
    "quantize_q4_1",
    "quantize_q8_0",
    "unpack_q4",
]
