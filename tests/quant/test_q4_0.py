"""llama.cpp's Q4_0 held as Q4_1 blocks (m = -8 d): the bytes equal the ``gguf`` package's
reference quantiser (a port of llama.cpp's ``quantize_row_q4_0_ref``), the dequantised weights
equal its dequantiser exactly, and the layer computes with them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn

from lmarch.quant import quantize_
from lmarch.quant.blockq import BlockQ4Linear
from lmarch.quant.q4_0 import q4_0_linear, quantize_q4_0


def _weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02
    w[3, :32] = 0.0  # an all-zero block: d = 0, codes 8
    w[4, 40] = -w[4, 32:64].abs().max() * 3  # a negative extreme: d > 0
    w[5, 70] = w[5, 64:96].abs().max() * 3  # a positive extreme: d < 0
    w[6, 96:128] = 0.5  # equal magnitudes: the first one sets d
    return w


def test_bytes_equal_llama_cpp_reference():  # type: ignore[no-untyped-def]
    w = _weight()
    blocks = quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(96, 8, 18)
    lin = nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = q4_0_linear(lin)
    assert isinstance(layer, BlockQ4Linear)
    assert np.array_equal(layer.codes.numpy().reshape(96, 8, 16), blocks[..., 2:])
    d_bytes = layer.dm[..., 0].contiguous().numpy().view(np.uint8).reshape(96, 8, 2)
    assert np.array_equal(d_bytes, blocks[..., :2])
    m = layer.dm[..., 1].view(torch.float16).float()
    assert torch.equal(m, -8 * layer.dm[..., 0].view(torch.float16).float())  # exact in fp16
    reference = dequantize(
        quantize(w.numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0
    )
    assert torch.equal(layer.dequantized_weight(), torch.from_numpy(reference))
    codes, d = quantize_q4_0(w)
    assert codes[3, :32].tolist() == [8] * 32 and d[3, 0] == 0
    x = torch.randn(3, 256)
    torch.testing.assert_close(
        layer(x), F.linear(x, torch.from_numpy(reference), lin.bias), atol=1e-4, rtol=1e-4
    )


def test_quantize_scheme_q4_0():  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    quantize_(model, "q4_0")
    assert all(type(model[i]) is BlockQ4Linear for i in (0, 2))
