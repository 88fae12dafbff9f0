"""Weight-only int4 linear layers: asymmetric, one scale and zero point per group of inputs.

Each row of the weight is cut along the input dimension into groups of G consecutive values
(G = 32, 64, 128 or 256). A group with range [lo, hi] is mapped onto the 16 levels of a 4-bit
code q in {0, ..., 15}:

    s  = (hi - lo) / 15                        step between levels (rounded *up* to bfloat16)
    z  = bf16(lo + 8 s)                        the value of the middle code q = 8
    q  = clamp(round((W - z) / s) + 8, 0, 15)
    W~ = (q - 8) * s + z                       dequantised weight

"Asymmetric" because the grid [z - 8s, z + 7s] follows the group's own range instead of being
centred on zero, which matters for groups whose values are mostly of one sign. Rounding gives
|W - W~| <= s / 2 for every element, with s the stored scale of the element's group.

The zero point is stored as z, the value at q = 8 (not as lo = the value at q = 0, nor as an
integer offset), because that is the convention of torch's CPU kernel
``torch._weight_int4pack_mm_for_cpu``: it reads q from the packed weight and computes
(q - 8) * scale + zero. We verified this by experiment: with scale = 1 and zero = 0 the kernel
multiplying an identity matrix returns q - 8, with zero = 8 it returns q itself.

If z is rounded to bfloat16 by more than half a step, the grid no longer covers [lo, hi] to
within s/2; in that (rare) case s is widened to max((z - lo) / 8.5, (hi - z) / 7.5), which
restores the bound. For ordinary weight groups s is simply (hi - lo) / 15 rounded up.

Kernel conventions on torch 2.13 (CPU; see ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``):

* ``torch._convert_weight_to_int4pack_for_cpu(q_int32 [N, K], inner_k_tiles)`` takes the codes
  0..15 as int32 [N, K] and returns uint8 [N, K/2]; ``inner_k_tiles`` is ignored on CPU. The
  byte order inside is the kernel's own and depends on the CPU (blocks of 64 outputs on
  AVX-512, 32 on AVX2): it is *not* portable, so the state dict holds our own packing instead.
* N must be a multiple of 16; K a multiple of the group size; group size 32, 64, 128 or 256.
* ``scales_and_zeros`` is [K/G, N, 2] — group-major, then output, then (scale, zero) — in the
  same dtype as the activation.
* ``torch._weight_int4pack_mm_for_cpu(x [M, K], packed, G, scales_and_zeros)`` returns
  x W~^T [M, N] in x's dtype. Only the bfloat16 path is vectorised, so the layer casts the
  activation to bfloat16 and the result back. There is no autograd formula: an input that
  requires grad takes the plain path (dequantise, then ``F.linear``), as do layers the kernel
  cannot take (N not a multiple of 16, or not on CPU).

Portable storage (the ``qweight`` entry of the state dict): uint8 [N, K/2], byte j of row n
holding q[n, 2j] in its low nibble and q[n, 2j+1] in its high nibble.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.quant.int8 import round_up_to_bfloat16
from lmarch.weights.gguf import unpack_nibbles

__all__ = [
    "INT4_GROUP_SIZES",
    "Int4WeightOnlyLinear",
    "check_int4_shape",
    "dequantize_int4",
    "int4_kernel_available",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]

INT4_GROUP_SIZES = (32, 64, 128, 256)


def check_int4_shape(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ``LmarchError`` unless a [out, in] weight can be quantised with ``group_size``."""
    if group_size not in INT4_GROUP_SIZES:
        raise LmarchError(
            f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}",
            hint="use 32 (most accurate), 64 or 128",
        )
    if in_features % group_size != 0:
        raise LmarchError(
            f"int4 with group size {group_size} needs in_features divisible by it, "
            f"got in_features={in_features} (out_features={out_features})",
            hint="choose a group size that divides in_features, or keep this layer in float",
        )


def quantize_int4(weight: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """Asymmetric group-wise int4 quantisation of a [N, K] weight.

    Returns ``(q, scales_and_zeros)``: codes q uint8 [N, K] in 0..15, and bfloat16
    [K/G, N, 2] holding (scale, zero) per group in the kernel's layout, with
    ``W~ = (q - 8) * scale + zero``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_int4_shape(k, n, group_size)
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    step = (hi - lo) / 15.0
    zero = (lo + 8.0 * step).to(torch.bfloat16)
    z = zero.float()
    # widen the step if rounding z to bfloat16 moved the grid by more than half a step
    step = torch.maximum(step, torch.maximum((z - lo) / 8.5, (hi - z) / 7.5))
    scale = round_up_to_bfloat16(step)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any s works
    s = scale.float()
    q = torch.round((w - z[..., None]) / s[..., None]) + 8.0
    q = q.clamp_(0, 15).to(torch.uint8).reshape(n, k)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """W~ = (q - 8) * scale + zero for codes q [N, K] and (scale, zero) [K/G, N, 2]; float32."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
    scale, zero = sz[..., 0:1], sz[..., 1:2]
    codes = q.float().reshape(n, k // group_size, group_size)
    return ((codes - 8.0) * scale + zero).reshape(n, k)


def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the input dimension: uint8 [N, K] -> uint8 [N, K/2]."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K/2] -> codes uint8 [N, K]."""
    return unpack_nibbles(packed, interleaved=True)


@functools.cache
def int4_kernel_available(device_type: str = "cpu") -> bool:
    """Whether the CPU int4 kernel and its packing function run on this build (CPU only)."""
    names = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    if device_type != "cpu" or not all(hasattr(torch, name) for name in names):
        return False
    try:
        q = torch.full((16, 32), 9, dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.tensor([1.0, 0.0], dtype=torch.bfloat16).expand(1, 16, 2).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(
            torch.ones(1, 32, dtype=torch.bfloat16), packed, 32, sz
        )
    except (RuntimeError, NotImplementedError):
        return False
    return bool((y.float() == 32.0).all())  # 32 inputs times (9 - 8) * 1 + 0


class Int4WeightOnlyLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is stored as 4-bit codes in groups of inputs.

    Buffers: ``qweight`` uint8 [out, in/2] (in memory: the CPU kernel's packing when the kernel
    can take the layer, otherwise the portable packing; in the state dict: always the portable
    one) and ``scales_and_zeros`` bfloat16 [in/G, out, 2]; ``bias`` stays a float parameter.
    Build one with :meth:`from_linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 32,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int4_shape(in_features, out_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self._kernel_packed = False  # True: qweight holds the CPU kernel's (non-portable) layout
        self.register_buffer(
            "qweight",
            torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8, device=device),
        )
        sz = torch.zeros(in_features // group_size, out_features, 2, device=device)
        sz[..., 0] = 1.0
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._pack_for_kernel()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4WeightOnlyLinear:
        """Quantise ``linear``'s weight (its bias is copied as it is). ``linear`` is not changed."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            device=weight.device,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
        )
        q, scales_and_zeros = quantize_int4(weight, group_size)
        layer._kernel_packed = False  # replaced wholesale: no need to unpack the initial codes
        layer.qweight = pack_int4(q)
        layer.scales_and_zeros.copy_(scales_and_zeros)
        layer._pack_for_kernel()
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    @classmethod
    def from_codes(
        cls, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int = 32
    ) -> Int4WeightOnlyLinear:
        """A bias-free layer from codes already chosen: ``codes`` uint8 [out, in] in 0..15,
        ``scale`` and ``zero`` [out, in / group_size], so that W~ = (q - 8) * scale + zero.

        This is how block-quantised files (llama.cpp's Q4_0 / Q4_1) become layers without
        being quantised a second time; only scale and zero are rounded to bfloat16.
        """
        n, k = codes.shape
        if scale.shape != (n, k // group_size) or zero.shape != scale.shape:
            raise ValueError(
                f"scale/zero must be [{n}, {k // group_size}], got {tuple(scale.shape)} "
                f"and {tuple(zero.shape)}"
            )
        layer = cls(k, n, bias=False, group_size=group_size, device="meta")  # nothing to pack
        sz = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1)
        layer.scales_and_zeros = sz.to(torch.bfloat16).contiguous()
        layer.qweight = codes.to(torch.uint8)  # placeholder on the CPU, for the checks below
        if layer._kernel_can_take():
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            layer.qweight, layer._kernel_packed = packed, True
        else:
            layer.qweight, layer._kernel_packed = pack_int4(codes), False
        return layer

    # -- storage -------------------------------------------------------------------------------

    @property
    def kernel_packed(self) -> bool:
        """Whether ``qweight`` is in the CPU kernel's layout (so the forward uses the kernel)."""
        return self._kernel_packed

    def _kernel_can_take(self) -> bool:
        return (
            self.qweight.device.type == "cpu"
            and self.out_features % 16 == 0
            and int4_kernel_available("cpu")
        )

    def _pack_for_kernel(self) -> None:
        """Portable packing -> the kernel's packing, when the kernel can take this layer."""
        if self._kernel_packed or not self._kernel_can_take():
            return
        codes = unpack_int4(self.qweight).to(torch.int32)
        self.qweight = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self._kernel_packed = True

    def _kernel_codes(self) -> Tensor:
        """The codes q [N, K] read back from the kernel's packing.

        The kernel is run on the identity matrix with scale 1 and zero 8, so that it returns
        (q - 8) * 1 + 8 = q exactly — without depending on the packing's byte order.
        """
        k, g = self.in_features, self.group_size
        eye = torch.eye(k, dtype=torch.bfloat16, device=self.qweight.device)
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=self.qweight.device)
        sz = unit.expand(k // g, self.out_features, 2).contiguous()
        codes = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, g, sz)  # [K, N]
        return codes.t().to(torch.uint8)

    def _unpack_from_kernel(self) -> None:
        if self._kernel_packed:
            self.qweight = pack_int4(self._kernel_codes())
            self._kernel_packed = False

    def codes(self) -> Tensor:
        """The 4-bit codes q uint8 [out, in], values 0..15."""
        return self._kernel_codes() if self._kernel_packed else unpack_int4(self.qweight)

    def dequantized_weight(self) -> Tensor:
        """The weight the layer effectively multiplies by, W~ = (q - 8) s + z, float32 [out, in]."""
        return dequantize_int4(self.codes(), self.scales_and_zeros, self.group_size)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """y = x W~^T + b, by the int4 kernel in bfloat16 where it applies."""
        use_kernel = (
            self._kernel_packed
            and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
        )
        if not use_kernel:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        # dtype checks in Python, not no-op casts: at batch 1 every dispatched call counts
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        sz = self.scales_and_zeros
        if sz.dtype != torch.bfloat16:  # after a model-wide .float() / .half()
            sz = sz.to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, sz)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)

    # -- keeping the non-portable packing out of state dicts and off other devices ----------------

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_packed:
            destination[prefix + "qweight"] = pack_int4(self._kernel_codes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if prefix + "qweight" in state_dict:
            # the incoming tensor is in the portable layout; it replaces the kernel packing
            self._kernel_packed = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pack_for_kernel()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int4WeightOnlyLinear:
        if self._kernel_packed:
            target = fn(torch.empty(0, dtype=torch.uint8, device=self.qweight.device)).device
            if target != self.qweight.device:
                self._unpack_from_kernel()  # the kernel's packing only means something on CPU
        super()._apply(fn, recurse)
        # scales and zeros are the kernel's operands, bf16 whatever dtype the model moves to
        if self.scales_and_zeros.dtype != torch.bfloat16:
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        self._pack_for_kernel()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int4 group_size={self.group_size}"
        )
