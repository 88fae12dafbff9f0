"""Q5_0 blocks re-encoded as Q8_0 (how a Gemma 3 file's Q5_0 matrices are kept) hold exactly
the weights the gguf package dequantises from the Q5_0 bytes: same float16 scale, code q - 16."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from lmarch.quant.blockq import BlockQ8Linear
from lmarch.quant.gguf import q5_0_as_q8_0


def test_q5_0_re_encodes_as_q8_0_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    rows, blocks_per_row = 24, 5
    blocks = rng.integers(0, 256, (rows * blocks_per_row, 22), dtype=np.uint8)  # every code
    halves = rng.standard_normal(len(blocks)) * 10.0 ** rng.integers(-7, 1, len(blocks))
    halves = halves.astype(np.float16)
    halves[::13] = 0.0  # zero and subnormal scales too
    blocks[:, :2] = halves.view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(rows, -1)

    codes, d_bits = q5_0_as_q8_0(raw)
    assert codes.dtype == torch.int8 and d_bits.dtype == torch.int16
    assert codes.shape == (rows, 32 * blocks_per_row) and d_bits.shape == (rows, blocks_per_row)
    assert int(codes.min()) == -16 and int(codes.max()) == 15

    expected = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType.Q5_0)
    # the same numbers as stored Q8_0 bytes, dequantised by gguf ...
    q8 = np.concatenate(
        [
            d_bits.numpy().reshape(-1, 1).view(np.uint8),
            codes.numpy().reshape(-1, 32).view(np.uint8),
        ],
        axis=1,
    )
    as_q8 = gguf.quants.dequantize(q8.reshape(-1), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(as_q8.view(np.uint32), expected.reshape(-1).view(np.uint32))
    # ... and by the layer the loader builds
    layer = BlockQ8Linear.from_blocks(codes, d_bits)
    weight = layer.dequantized_weight().numpy()
    assert np.array_equal(weight.view(np.uint32), expected.reshape(rows, -1).view(np.uint32))
