"""NF4: the 4-bit NormalFloat weights of QLoRA, with double quantisation of the block scales.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores a frozen
weight in 4 bits per element using a code book whose 16 values are quantiles of the standard
normal distribution — pretrained weights are roughly normal, so each code is used about equally
often. The weight is flattened (row-major) and cut into blocks of B = 64 elements; each block b
keeps its absolute maximum c_b and each element the index of its nearest code value:

    q_i   = argmin_j | w_i / c_b - N_j |          N = the 16 NormalFloat values (-1 .. 1)
    w~_i  = N[q_i] * c_b                          dequantised weight

Two indices share one byte: the element with the even index in the high nibble, the next one
in the low nibble (bitsandbytes' layout; a tensor of odd size is padded with the value 0,
code 7).

Double quantisation (QLoRA section 3) compresses the float32 constants c in turn: their mean
mu is subtracted, and the centred values are quantised to 8 bits in blocks of 256 with the
signed 8-bit "dynamic" code book (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
Learning": 7 decades of linearly spaced values, plus 0 and 1), each of those blocks keeping its
own float32 absolute maximum d:

    c~_b = D[r_b] * d_{b // 256} + mu              D = the 256 dynamic values, r_b uint8

Storage per parameter (what :meth:`NF4Linear.bits_per_parameter` measures from the buffers):

    without double quantisation   4 + 32 / B                   = 4.5       bits (B = 64)
    with double quantisation      4 + 8 / B + 32 / (256 B)     = 4.127     bits
                                  (+ 32 bits for mu, once per tensor)

Everything follows bitsandbytes 0.50 on the CPU byte for byte — the order of the arithmetic
too (a block's values are multiplied by 1 / c_b, the last, partial block is divided by its
maximum, a value halfway between two NF4 codes takes the lower one, and the 8-bit code is found
through bitsandbytes' 65536-point lookup table, see :func:`_quantize_dynamic`) — so the tests
compare the codes and constants for equality with ``bitsandbytes.functional.quantize_4bit``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.errors import LmarchError

__all__ = [
    "NF4_BLOCK_SIZES",
    "NF4_CODE",
    "NF4Linear",
    "NF4Weight",
    "check_nf4",
    "dequantize_nf4",
    "dynamic_code",
    "normal_float_code",
    "quantize_nf4",
]

# The 16 NormalFloat values as QLoRA publishes them (float32); :func:`normal_float_code`
# derives them from the normal quantiles.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# a value exactly halfway between two code values goes to the lower one
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK = 256  # double quantisation: blocks of 256 absmax constants
_TINY = 1e-38  # stands in for a zero block maximum in the 4-bit step, as bitsandbytes does


def normal_float_code(offset: float = 0.9677083) -> Tensor:
    """The NF4 code book from first principles (QLoRA eq. 4, asymmetric variant): 8 positive
    values Phi^-1(p) for p evenly spaced from ``offset`` down to 1/2 (exclusive), 7 negative
    ones the same way with 7 points, and an exact zero; divided by the largest, so the range is
    [-1, 1]. ``offset`` = 0.9677 is the midpoint of 1 - 1/(2*15) and 1 - 1/(2*16), chosen in the
    paper so that the extreme quantiles are finite. Equal to :data:`NF4_CODE` to ~1e-7."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.max()).float()


@functools.cache
def dynamic_code() -> Tensor:
    """The signed 8-bit dynamic code book [256] (Dettmers 2016), sorted ascending.

    For each decade e = 0..6 the magnitudes 10^(e-6) * m, where m runs over the 2^e midpoints of
    2^e + 1 evenly spaced points in [0.1, 1], with both signs (254 values), plus 0 and 1. The
    arithmetic (all in float32, the decade factor applied to the midpoints) is bitsandbytes', so
    the values are identical to its ``create_dynamic_map()``.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        decade = 10 ** (e - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


_GRID = 65536  # points of [-1, 1] in bitsandbytes' lookup table for the 8-bit code


@functools.cache  # built on first use, not at import (every command imports this module)
def _dynamic_lookup() -> Tensor:
    """uint8 [65536]: for grid point g_i = -1 + 2i / 65535, the index of the first code value
    whose midpoint with the next one is >= g_i (i.e. the nearest code to g_i, ties downward)."""
    code = dynamic_code()
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / (_GRID - 1)
    return torch.searchsorted(mids, grid).to(torch.uint8)


@dataclass
class NF4Weight:
    """An NF4-quantised tensor: ``codes`` uint8 [ceil(numel / 2)] (two 4-bit indices a byte,
    high nibble first); ``absmax`` float32 [blocks] — or, double quantised, uint8 [blocks] with
    ``nested_absmax`` float32 [ceil(blocks / 256)] and ``offset`` float32 [] (the mean mu)."""

    codes: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    block_size: int = 64
    nested_absmax: Tensor | None = None
    offset: Tensor | None = None
    dtype: torch.dtype = torch.float32

    @property
    def double_quant(self) -> bool:
        """Whether the block maxima are themselves 8-bit (QLoRA's double quantisation)."""
        return self.nested_absmax is not None


def _check_float(weight: Tensor) -> None:
    if not weight.is_floating_point():
        raise LmarchError(
            f"NF4 quantises floating-point weights, got a {str(weight.dtype).removeprefix('torch.')} tensor",
            hint="NF4 applies to float32, float16 or bfloat16 weights only",
        )


def _check_block(block_size: int) -> None:
    if block_size not in NF4_BLOCK_SIZES:
        raise LmarchError(
            f"NF4 block size must be one of {NF4_BLOCK_SIZES}, got {block_size}",
            hint="QLoRA uses 64",
        )


def check_nf4(weight: Tensor, block_size: int = 64) -> None:
    """Raise ``LmarchError`` unless ``weight`` can be stored in NF4 with blocks of
    ``block_size``: a non-empty floating-point tensor, a block size bitsandbytes offers."""
    _check_float(weight)
    _check_block(block_size)
    if weight.numel() == 0:
        raise LmarchError("NF4 cannot quantise an empty tensor")


def _blockwise(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(values scaled into [-1, 1], block maxima) of a flat float32 tensor, blocks of ``block``;
    full blocks multiply by 1 / max, the partial last block divides by its (clamped) max."""
    n = flat.numel()
    full = n - n % block
    head = flat[:full].view(-1, block)
    absmax = head.abs().amax(dim=1)
    scaled = (head * (1.0 / absmax.clamp(min=_TINY))[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp_(-1, 1)])
    return scaled, absmax


def _quantize_dynamic(values: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit dynamic blockwise quantisation (blocks of 256) of a flat float32 tensor: codes
    uint8 and each block's max |v| float32.

    As bitsandbytes' CPU kernel does it: v / max is snapped to the nearest of 65536 evenly
    spaced points of [-1, 1] (t = trunc(((v / max + 1) / 2) * 65535 + 1/2)), and the point to
    its nearest code — the nearest code to v / max itself except within ~1.5e-5 of a midpoint
    between two codes. A block of zeros gets maximum 0 and codes 0 (they decode to 0).
    """
    n = values.numel()
    blocks = -(-n // NESTED_BLOCK)
    padded = F.pad(values, (0, blocks * NESTED_BLOCK - n)).view(blocks, NESTED_BLOCK)
    # padding zeros never raise a maximum; the partial block's maximum is over its own values
    amax = padded.abs().amax(dim=1)
    nonzero = amax > 0
    inv = torch.where(nonzero, 1.0 / amax, torch.zeros_like(amax))
    normed = (padded * inv[:, None]).clamp_(-1, 1)
    point = (((normed + 1.0) * 0.5) * (_GRID - 1) + 0.5).long()  # truncation, as C's cast
    codes = _dynamic_lookup().to(values.device)[point]
    codes = torch.where(nonzero[:, None], codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], amax


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4 blockwise absmax quantisation of a float tensor of any shape (see the module
    docstring for the equations); with ``double_quant`` the block maxima are stored in 8 bits
    (blocks of 256, mean removed). A size that is not a multiple of ``block_size`` leaves a
    shorter last block, as in bitsandbytes."""
    check_nf4(weight, block_size)
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise(flat, block_size)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, _NF4_BOUNDS.to(scaled.device)).to(torch.uint8)
    codes = (idx[0::2] << 4) | idx[1::2]
    out = NF4Weight(codes, absmax, tuple(weight.shape), block_size, dtype=weight.dtype)
    if double_quant:
        offset = absmax.mean()
        out.absmax, out.nested_absmax = _quantize_dynamic(absmax - offset)
        out.offset = offset
    return out


def _absmax_of(q: NF4Weight) -> Tensor:
    if q.nested_absmax is None:
        return q.absmax.float()
    d = q.nested_absmax.float().repeat_interleave(NESTED_BLOCK)[: q.absmax.numel()]
    return dynamic_code().to(q.absmax.device)[q.absmax.long()] * d + q.offset.float()


# byte b = 16 hi + lo -> (N[hi], N[lo]): one lookup decodes both of a byte's elements
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """w~ = N[q] * c (c decoded first when double quantised), computed in float32 and returned
    in ``dtype`` (default: the dtype the weight had) with the weight's shape."""
    n = math.prod(q.shape)
    # index_select with int32 indices is ~2.5x faster on CPU than indexing with int64 ones, and
    # the lookup's result is a fresh tensor, so the scales multiply into it in place
    table = _NF4_PAIRS.to(q.codes.device)
    values = torch.index_select(table, 0, q.codes.int()).view(-1)[:n]
    scale = _absmax_of(q)
    full = n - n % q.block_size
    values[:full].view(-1, q.block_size).mul_(scale[: full // q.block_size, None])
    if full < n:  # the shorter last block
        values[full:].mul_(scale[-1])
    return values.view(q.shape).to(dtype or q.dtype)


class _NF4MatMul(torch.autograd.Function):
    """y = x W~^T + b with W~ dequantised in the forward and again in the backward
    (dL/dx = g W~): autograd would otherwise keep every layer's float32 W~ from the forward
    until the backward, i.e. the whole float model during a training step. The codes are
    buffers, so there is no gradient for the weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: NF4Linear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight().to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        dx = grad @ ctx.layer.dequantized_weight().to(grad.dtype)
        db = grad.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 (QLoRA) and dequantised on the fly:
    y = x W~^T + b with W~ = :func:`dequantize_nf4` of the stored codes.

    Buffers: ``codes`` uint8 [ceil(out * in / 2)], ``absmax`` (float32, or uint8 with
    ``nested_absmax`` float32 and ``offset`` float32 [] when double quantised); ``bias`` is a
    frozen float parameter. The codes are buffers, so no gradient can reach them; gradients do
    flow to the input, which is what a LoRA adapter on top needs. Model-wide dtype casts
    (``model.to(torch.bfloat16)``) leave the float32 constants in float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        device: torch.device | str | None = None,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _check_block(block_size)
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.weight_dtype = weight_dtype
        n = in_features * out_features
        blocks = -(-n // block_size)
        self.register_buffer("codes", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        if double_quant:
            nested = -(-blocks // NESTED_BLOCK)
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(nested, device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))
            self.nested_absmax = self.offset = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True
    ) -> NF4Linear:
        """Quantise ``linear``'s weight to NF4 (its bias is copied, frozen). ``linear`` is not
        changed. Refused with ``LmarchError``: a weight that is not floating point."""
        weight = linear.weight
        q = quantize_nf4(weight, block_size, double_quant)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            double_quant=double_quant,
            device=weight.device,
            weight_dtype=weight.dtype,
        )
        layer.codes.copy_(q.codes)
        layer.absmax.copy_(q.absmax)
        if double_quant:
            layer.nested_absmax.copy_(q.nested_absmax)
            layer.offset.copy_(q.offset)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def quantized(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` (views of the buffers, no copy)."""
        return NF4Weight(
            self.codes,
            self.absmax,
            (self.out_features, self.in_features),
            self.block_size,
            self.nested_absmax,
            self.offset,
            self.weight_dtype,
        )

    def dequantized_weight(self) -> Tensor:
        """W~ [out, in] in float32, as the forward uses it."""
        return dequantize_nf4(self.quantized(), torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        """y = x W~^T + b, W~ dequantised for this call (never kept, so memory stays 4-bit:
        when a gradient flows to x, the backward dequantises W~ again, as QLoRA does)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4MatMul.apply(x, self, bias)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def bits_per_parameter(self) -> float:
        """Stored bits of the weight (codes and every constant, bias excluded) per weight
        element: 4 + 8/B + 32/(256 B) (+ 32 / numel) with double quantisation, 4 + 32/B without
        — 4.127 and 4.5 for B = 64."""
        buffers = [self.codes, self.absmax]
        if self.double_quant:
            buffers += [self.nested_absmax, self.offset]
        bits = sum(b.numel() * b.element_size() * 8 for b in buffers)
        return bits / (self.in_features * self.out_features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NF4Linear:
        # a model-wide .half() / .to(bfloat16) would round the float32 constants: keep them
        keep = {
            k: v for k, v in self._buffers.items() if v is not None and v.dtype == torch.float32
        }
        super()._apply(fn, recurse)
        for name, before in keep.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 block={self.block_size}{dq}"
        )
