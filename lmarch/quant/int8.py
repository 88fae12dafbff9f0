"""Weight-only int8 linear layers: symmetric, one scale per output channel.

Each row W_o of the weight (one output feature) gets its own scale, chosen so that the row's
largest magnitude lands on the edge of the int8 grid:

    s_o  = max_k |W_ok| / 127                          (rounded *up* to bfloat16, see below)
    q_ok = clamp(round(W_ok / s_o), -127, 127)         int8, symmetric: -128 is never used
    W~_ok = q_ok * s_o                                 dequantised weight
    y    = x W~^T + b = (x q^T) * s + b                the scale factors out of the dot product

Rounding to the nearest grid point gives |W_ok - W~_ok| <= s_o / 2 for every element.

The activations stay in floating point ("weight-only" quantisation): the matrix multiply reads
8-bit weights — a quarter of fp32's memory traffic, which is what batch-1 decoding is bound by —
and widens them on the fly. On CPU this is ``torch._weight_int8pack_mm(x, q, s)`` with
x [M, K], q int8 [N, K] (the nn.Linear layout, no repacking) and s [N] of *the same dtype as x*.
Its vectorised paths exist for bfloat16 (and float16) activations only — fp32 input takes a
scalar loop that is several times slower than an fp32 ``nn.Linear`` — so the layer casts the
input to bfloat16, runs the kernel, and casts the result back to the input's dtype.

Why the scale is rounded up to bfloat16: the kernel multiplies by the bfloat16 copy of s. If
q were computed with the exact fp32 s and then multiplied by a rounded s, the error bound
above would no longer hold (127 * |s - bf16(s)| can reach s/4). Quantising *with* the stored
bfloat16 scale keeps the bound exact, and rounding it up (never down) keeps |W/s| <= 127, so
the clamp never bites.

Kernel requirements found on torch 2.13 (see ``aten/src/ATen/native/cpu/int8mm_kernel.cpp``):
the AVX2/AVX-512 paths step through K in chunks of 8/16 with *aligned* loads of the activation
rows (and of the weight rows on AVX-512), so K must be a multiple of 16 and the data 64-byte
aligned — violating this gives wrong numbers or a segfault, not an error. The layer checks both
and otherwise takes the plain path (dequantise, then ``F.linear``). The kernel has no autograd
formula either, so an input that requires grad also takes the plain path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Int8WeightOnlyLinear",
    "dequantize_int8",
    "int8_kernel_available",
    "quantize_int8",
    "round_up_to_bfloat16",
]

_ALIGN_BYTES = 64  # the CPU allocator's alignment; AVX-512 aligned loads need 64


def round_up_to_bfloat16(x: Tensor) -> Tensor:
    """The smallest bfloat16 value >= each element of ``x`` (returned as bfloat16).

    Rounding a positive scale up rather than to the nearest value guarantees that no weight
    divided by the stored scale falls outside the integer grid.
    """
    nearest = x.to(torch.bfloat16)
    too_small = nearest.float() < x.float()
    bumped = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    return torch.where(too_small, bumped, nearest)


_ROWS_PER_BLOCK = 4096


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 quantisation of a [N, K] weight.

    Returns ``(q, scale)``: q int8 [N, K] with values in [-127, 127] and scale bfloat16 [N],
    such that ``q * scale`` approximates ``weight`` with error <= scale / 2 per element.
    A row of zeros gets scale 1 (any positive value represents it exactly).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    # rows are independent: work through them in blocks so a large matrix (a 49152-row output
    # head) never has several float32 copies alive at once
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = []
    for start in range(0, weight.shape[0], _ROWS_PER_BLOCK):
        w = weight[start : start + _ROWS_PER_BLOCK].detach().float()
        scale = round_up_to_bfloat16(w.abs().amax(dim=1) / 127.0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q[start : start + len(w)] = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)
        scales.append(scale)
    return q, torch.cat(scales)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """W~ = q * scale (per row), in float32. Exact: an 8-bit integer times a bfloat16 fits fp32."""
    return q.float() * scale.float()[:, None]


@functools.cache
def int8_kernel_available(device_type: str = "cpu") -> bool:
    """Whether ``torch._weight_int8pack_mm`` runs on this build for ``device_type``.

    Only the CPU kernel is used (its shape and alignment rules are the ones verified above);
    other devices dequantise on the fly.
    """
    if device_type != "cpu" or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 16, dtype=torch.bfloat16)
        q = torch.ones(4, 16, dtype=torch.int8)
        s = torch.ones(4, dtype=torch.bfloat16)
        y = torch._weight_int8pack_mm(x, q, s)
    except (RuntimeError, NotImplementedError):
        return False
    return bool((y.float() == 16.0).all())


def _is_aligned(t: Tensor) -> bool:
    return t.data_ptr() % _ALIGN_BYTES == 0


class Int8WeightOnlyLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is stored as int8 with one scale per output.

    Buffers: ``qweight`` int8 [out, in], ``scale`` bfloat16 [out]; ``bias`` stays a float
    parameter. Build one with :meth:`from_linear`. The forward pass accepts any leading shape
    [..., in] and returns [..., out] in the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Quantise ``linear``'s weight (its bias is copied as it is). ``linear`` is not changed."""
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> Int8WeightOnlyLinear:
        """A layer computing x W^T + b with ``weight`` [out, in] quantised to int8 (``weight``
        may also be an embedding table, for an output head tied to it)."""
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            bias=bias is not None,
            device=weight.device,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
        )
        q, scale = quantize_int8(weight)
        layer.qweight.copy_(q)
        layer.scale.copy_(scale)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
            layer.bias.requires_grad_(bias.requires_grad)
        return layer

    def dequantized_weight(self) -> Tensor:
        """The weight the layer effectively multiplies by, W~ = q * s, float32 [out, in]."""
        return dequantize_int8(self.qweight, self.scale)

    def _use_kernel(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and self.in_features % 16 == 0
            and not (x.requires_grad and torch.is_grad_enabled())
            and int8_kernel_available("cpu")
            and self.qweight.is_contiguous()
            and _is_aligned(self.qweight)
        )

    def forward(self, x: Tensor) -> Tensor:
        """y = (x q^T) * s + b, computed by the int8 kernel in bfloat16 where it applies."""
        if not self._use_kernel(x):
            return F.linear(x, self.dequantized_weight().to(x.dtype), self._bias_as(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if not x2.is_contiguous() or not _is_aligned(x2):
            x2 = x2.clone(memory_format=torch.contiguous_format)  # the kernel loads aligned rows
        scale = self.scale if self.scale.dtype == torch.bfloat16 else self.scale.bfloat16()
        y = torch._weight_int8pack_mm(x2, self.qweight, scale)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)

    def _bias_as(self, dtype: torch.dtype) -> Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Tensors assigned from a memory-mapped file may sit at any address; the kernel's
        # aligned loads need the allocator's 64-byte alignment.
        if not _is_aligned(self.qweight) or not self.qweight.is_contiguous():
            self.qweight = self.qweight.contiguous().clone()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int8WeightOnlyLinear:
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.bfloat16:  # the kernel's operand, whatever the model's dtype
            self.scale = self.scale.to(torch.bfloat16)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 per-channel"
        )
