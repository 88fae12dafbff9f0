"""GGUF K-quants, Q5_0, Q5_1 and IQ4_NL dequantised by lmarch equal the gguf package's
dequantisation bit for bit, on synthetic blocks of every type and through the file reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmarch.weights.gguf import read_gguf
from lmarch.weights.gguf_kquants import BLOCK_SHAPES, dequantize_blocks, k4_scales_and_mins

# byte offsets of the float16 constants in each block (d, and dmin or m where there is one)
HALF_OFFSETS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "IQ4_NL": (0,),
}


def random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes of ``n_blocks`` blocks with finite float16 constants of either sign, some
    subnormal, some zero (the code bytes take every value)."""
    rng = np.random.default_rng(seed)
    _, nbytes = BLOCK_SHAPES[type_name]
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for offset in HALF_OFFSETS[type_name]:
        halves = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-7, 1, n_blocks)).astype(
            np.float16
        )
        halves[::17] = 0.0
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("type_name", sorted(BLOCK_SHAPES))
def test_every_type_equals_the_gguf_package_bit_for_bit(type_name: str) -> None:
    blocks = random_blocks(type_name, 700)
    ours = dequantize_blocks(blocks, type_name)
    qtype = gguf.GGMLQuantizationType[type_name]
    theirs = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(ours.shape)
    assert ours.dtype == np.float32
    assert np.isfinite(theirs).all()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_k4_scale_packing_by_hand() -> None:
    """Scale A = 0b111111 in byte 0, its min a = 5 in byte 4; E = 0b110101 split as low4 0101
    in byte 8 and top2 11 in byte 0's top bits; min h = 0b100011: low4 in byte 11's top nibble,
    top2 in byte 7's top bits."""
    packed = np.zeros((1, 12), dtype=np.uint8)
    packed[0, 0] = 0b11_111111
    packed[0, 4] = 5
    packed[0, 8] = 0b0101
    packed[0, 11] = 0b0011 << 4
    packed[0, 7] = 0b10 << 6
    sc, mn = k4_scales_and_mins(packed)
    assert sc.tolist() == [[63, 0, 0, 0, 0b110101, 0, 0, 0]]
    assert mn.tolist() == [[5, 0, 0, 0, 0, 0, 0, 0b100011]]


def test_the_reader_uses_them_for_a_file_the_gguf_package_wrote(
    tmp_path: Path, monkeypatch
) -> None:
    """A [3, 512] Q4_K, a [2, 256] Q6_K and a Q5_0 tensor (quantised by the gguf package) read
    back through read_gguf in float32 and bfloat16 equal the gguf package's dequantisation,
    which the reader no longer calls for them."""
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(path, "test")
    stored = {
        "k4": ("Q4_K", random_blocks("Q4_K", 6, seed=1).reshape(3, -1)),
        "k6": ("Q6_K", random_blocks("Q6_K", 2, seed=2).reshape(2, -1)),
    }
    for name, (type_name, data) in stored.items():
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    q5 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0)
    writer.add_tensor("q5", q5, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    stored["q5"] = ("Q5_0", q5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    wants = {
        name: gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
        for name, (type_name, data) in stored.items()
    }

    def refuse(*args: object) -> None:
        raise AssertionError("the reader called gguf.quants.dequantize")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with read_gguf(path) as f:
        for name, (type_name, _) in stored.items():
            want = wants[name]
            got = f.load(name)
            assert f.tensor_info(name).type_name == type_name
            assert torch.equal(got, torch.from_numpy(want))
            assert torch.equal(f.load(name, torch.bfloat16), got.to(torch.bfloat16))
