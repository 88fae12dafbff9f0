"""llama.cpp's Q4_0: symmetric 4-bit blocks of 32 inputs, one float16 scale each.

For a block x_1..x_32, let x* be the element of largest magnitude (the first, if several), with
its sign. llama.cpp's reference quantiser (``quantize_row_q4_0_ref``) takes

    d   = x* / -8                                   stored as float16
    q_i = min(15, trunc(x_i / d + 8.5))             4-bit codes 0..15 (x* itself gets 0)
    x~_i = d (q_i - 8)                              dequantised weight

(the codes are chosen with the unrounded d, 1/d computed in float32, as llama.cpp does, so the
file's bytes are the ones llama.cpp would write). The extreme element lands exactly on -8 d,
so the grid's asymmetric end (+7 d) faces the other sign.

Q4_0 is Q4_1 with m = -8 d: x~ = d q + m. Both -8 d and the products are exact in float16 /
float32, so a Q4_0 block is stored as a :class:`~lmarch.quant.blockq.BlockQ4Linear` block
without any change of value and runs on the same native kernel (as the GGUF loader does for
Q4_0 files).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmarch.native import QK
from lmarch.quant.blockq import BlockQ4Linear, check_block_shape

__all__ = ["q4_0_linear", "quantize_q4_0"]


def quantize_q4_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_0 of a [N, K] weight (K divisible by 32): codes uint8 [N, K] (0..15) and d float32
    [N, K/32] holding float16 values, so that W~ = d (q - 8)."""
    n, k = weight.shape
    check_block_shape(k)
    w = weight.detach().float().reshape(n, k // QK, QK)
    extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))[..., 0]  # first of the largest
    d = extreme / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    codes = torch.trunc(w * inv[..., None] + 8.5).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), d.half().float()


def q4_0_linear(linear: nn.Linear) -> BlockQ4Linear:
    """An ``nn.Linear`` quantised to Q4_0, held as a :class:`BlockQ4Linear` with m = -8 d
    (bias copied, frozen). ``linear`` is not changed."""
    codes, d = quantize_q4_0(linear.weight)
    layer = BlockQ4Linear.from_codes(codes, d, -8.0 * d)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return layer
