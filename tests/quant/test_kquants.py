"""Q4_K / Q5_K / Q6_K layers kept as stored: native products (SIMD and portable builds) within 1e-4
of dequantise-then-multiply, exact fallback, exact dequantisation, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmarch import native
from lmarch.errors import LmarchError
from lmarch.native.kquant import kquant_matmul_eager
from lmarch.quant.blockq import BlockQ4Linear
from lmarch.quant.kquants import KQuantLinear, RowConcatLinear
from lmarch.weights.gguf_kquants import BLOCK_SHAPES

needs_native = pytest.mark.skipif(not native.native_available(), reason="no C compiler")
# byte offsets of the float16 constants and their size (weights of a few hundredths)
HALVES = {"Q4_K": ((0, 2), 2e-4), "Q5_K": ((0, 2), 1e-4), "Q6_K": ((208,), 5e-5)}


def random_layer(type_name: str, n: int = 80, k: int = 512, seed: int = 0) -> KQuantLinear:
    """A layer of random valid ``type_name`` super-blocks, [n, k]."""
    rng = np.random.default_rng(seed)
    _, nbytes = BLOCK_SHAPES[type_name]
    n_blocks = n * k // 256
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    offsets, scale = HALVES[type_name]
    for offset in offsets:
        halves = (rng.standard_normal(n_blocks) * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return KQuantLinear.from_blocks(torch.from_numpy(blocks.reshape(n, -1)), type_name)


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory) -> object:
    """The same C files built without SIMD flags: the plain-C path every CPU can run."""
    return native.load(native.build([], tmp_path_factory.mktemp("kernels")))


@needs_native
@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("build", ["simd", "portable"])
@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_native_product_equals_dequantise_then_multiply(
    type_name: str, build: str, rows: int, portable_library
) -> None:
    """Rounding the activations to 16 bits a block moves the output by < 1e-4 of its size."""
    lib = native.native_library() if build == "simd" else portable_library
    layer = random_layer(type_name)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(1))
    x[0, 32:64] = 0.0  # an all-zero block of activations (scale 0)
    y = kquant_matmul_eager(type_name, x, layer.blocks, lib=lib).double()
    ref = x.double() @ layer.dequantized_weight().double().T
    assert ref.abs().max().item() > 0.1
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_dequantised_weight_is_the_gguf_packages(type_name: str) -> None:
    layer = random_layer(type_name, n=4)
    qtype = gguf.GGMLQuantizationType[type_name]
    want = gguf.quants.dequantize(layer.blocks.numpy(), qtype)
    assert torch.equal(layer.dequantized_weight(), torch.from_numpy(want))


@needs_native
def test_the_layer_takes_the_kernel_and_its_operator_agrees() -> None:
    """Without gradients the layer is the native product (also as torch.ops.lmarch.*, the form
    a compiled graph calls); 3-D inputs keep their leading dims."""
    layer = random_layer("Q4_K", n=16)
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
    flat = kquant_matmul_eager("Q4_K", x.reshape(6, 512), layer.blocks)
    assert y.shape == (2, 3, 16) and torch.equal(y.reshape(6, 16), flat)
    op = torch.ops.lmarch.q4_k_matmul.default(x.reshape(6, 512), layer.blocks)
    assert torch.equal(op, flat)
    q5 = random_layer("Q5_K", n=16)
    op = torch.ops.lmarch.q5_k_matmul.default(x.reshape(6, 512), q5.blocks)
    assert torch.equal(op, kquant_matmul_eager("Q5_K", x.reshape(6, 512), q5.blocks))


def test_fallback_and_gradients_use_the_dequantised_weight() -> None:
    layer = random_layer("Q6_K", n=8)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(3))
    exact = F.linear(x, layer.dequantized_weight())
    layer.native = False
    assert torch.equal(layer(x), exact)
    layer.native = True
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert torch.equal(xg.grad, layer.dequantized_weight().sum(0).expand(4, 512))


def test_row_concat_is_its_parts_side_by_side() -> None:
    """A fused projection whose parts differ in format: the parts' outputs concatenated, and
    its weight their weights stacked."""
    parts = [random_layer("Q4_K", n=8, seed=4), random_layer("Q6_K", n=4, seed=5)]
    dense = torch.nn.Linear(512, 8, bias=False)
    parts.append(BlockQ4Linear.from_linear(dense))
    fused = RowConcatLinear(parts)
    assert (fused.in_features, fused.out_features) == (512, 20)
    weight = fused.dequantized_weight()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(6))
    for part in parts:
        part.native = False
    assert torch.equal(
        fused(x), torch.cat([F.linear(x, p.dequantized_weight()) for p in parts], -1)
    )
    assert torch.allclose(fused(x), F.linear(x, weight), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    layer = random_layer("Q6_K", n=8)
    save_file(layer.state_dict(), tmp_path / "w.safetensors")
    fresh = KQuantLinear(512, 8, "Q6_K")
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())


def test_refusals_name_the_problem() -> None:
    with pytest.raises(LmarchError, match="KQuantLinear holds Q4_K, Q5_K, Q6_K, not Q3_K"):
        KQuantLinear(512, 8, "Q3_K")
    with pytest.raises(LmarchError, match="Q4_K needs in_features divisible by 256, got 160"):
        KQuantLinear(160, 8, "Q4_K")
    with pytest.raises(LmarchError, match="rows of 100 bytes are not whole Q6_K super-blocks"):
        KQuantLinear.from_blocks(torch.zeros(2, 100, dtype=torch.uint8), "Q6_K")
