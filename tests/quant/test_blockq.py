"""Q4_1 / Q8_0 block layers and lmarch's native kernels, against the equations written out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmarch import native
from lmarch.errors import LmarchError
from lmarch.quant.apply import quantize_
from lmarch.quant.blockq import (
    BlockQ4Linear,
    BlockQ8Linear,
    pack_q4,
    quantize_q4_1,
    quantize_q8_0,
    unpack_q4,
)

QK = 32
needs_native = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0); the layers' PyTorch fallback is tested below all the same",
)


def _activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation rounding of blockq.c in torch: p = rint(x / e), e = max|x| / 32767."""
    m, k = x.shape
    blocks = x.reshape(m, k // QK, QK)
    e = blocks.abs().amax(-1) / 32767
    inv = torch.where(e > 0, 1 / e, torch.zeros_like(e))
    p = torch.round(blocks * inv[..., None])
    return p, e, blocks.sum(-1)


def _q4_reference(x: torch.Tensor, layer: BlockQ4Linear) -> torch.Tensor:
    """sum over blocks of d e sum(q p) + m sum(x), in float64."""
    p, e, sx = (t.double() for t in _activation_codes(x))
    n, k = layer.out_features, layer.in_features
    q = unpack_q4(layer.codes).double().reshape(n, k // QK, QK)
    dm = layer.dm.view(torch.float16).double()
    dots = torch.einsum("mbi,nbi->mnb", p, q)
    return (dots * dm[None, :, :, 0] * e[:, None] + dm[None, :, :, 1] * sx[:, None]).sum(-1)


def _q8_reference(x: torch.Tensor, layer: BlockQ8Linear) -> torch.Tensor:
    p, e, _ = (t.double() for t in _activation_codes(x))
    n, k = layer.out_features, layer.in_features
    q = layer.codes.double().reshape(n, k // QK, QK)
    d = layer.d.view(torch.float16).double()
    return (torch.einsum("mbi,nbi->mnb", p, q) * d[None] * e[:, None]).sum(-1)


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory) -> object:
    """The same C file built without SIMD flags: the plain-C path every CPU can run."""
    return native.load(native.build([], tmp_path_factory.mktemp("kernels")))


def _layers(seed: int = 0) -> tuple[BlockQ4Linear, BlockQ8Linear]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(96, 160, generator=g) * 0.1 + 0.02  # K = 5 blocks: odd, tests the tail
    linear = nn.Linear(160, 96, bias=False)
    linear.weight.data = weight
    return BlockQ4Linear.from_linear(linear), BlockQ8Linear.from_linear(linear)


@needs_native
def test_native_library_builds_here() -> None:
    """The test machines have a C compiler: the kernels must build (else every result below
    would silently come from the fallback), with the AVX2 path where the CPU has it."""
    lib = native.native_library()
    assert lib is not None
    assert lib.lmarch_blockq_simd() == (2 if native.simd_flags() else 0)


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("build", ["simd", "portable"])
def test_kernels_equal_the_block_equation(rows: int, build: str, portable_library) -> None:
    """Both builds compute d e sum(q p) + m sum(x) per block to float32 rounding (rel 1e-5)."""
    lib = native.native_library() if build == "simd" else portable_library
    q4, q8 = _layers()
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(1))
    x[0, :32] = 0.0  # an all-zero block of activations (scale 0)
    for layer, function, constants, reference in (
        (q4, "lmarch_q4_1_matmul", q4.dm, _q4_reference),
        (q8, "lmarch_q8_0_matmul", q8.d, _q8_reference),
    ):
        y = native.block_matmul(function, x, layer.codes, constants, lib=lib).double()
        ref = reference(x, layer)
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), function


@needs_native
def test_layers_approximate_the_dequantised_product() -> None:
    """Rounding the activations to 16 bits costs ~1e-5 of the output, and a batch of rows
    gives what the rows give one at a time."""
    q4, q8 = _layers()
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(3))
    for layer in (q4, q8):
        exact = F.linear(x, layer.dequantized_weight())
        y = layer(x)
        assert ((y - exact).norm() / exact.norm()).item() <= 1e-4
        rows = torch.cat([layer(x[i : i + 1]) for i in range(5)])
        assert torch.allclose(y, rows, rtol=0, atol=1e-6)


@needs_native
@pytest.mark.parametrize("rows", [1, 4])
def test_fused_swiglu_block_equals_its_two_layers(rows: int, portable_library) -> None:
    """One native call for W_down (SiLU(W_gate x) * (W_up x)) gives what the two Q4_1 layers
    give with PyTorch's SiLU in between (the hidden units are rounded to 16-bit codes in
    both), in the SIMD and the portable build; with gradients it is the layers themselves."""
    from lmarch.native import accelerate
    from lmarch.native.swiglu import NativeSwiGLU
    from lmarch.nn.ffn import GatedMLP

    torch.manual_seed(0)
    model = nn.Sequential(GatedMLP(64, 96), nn.Identity())
    quantize_(model, "q4")
    x = torch.randn(rows, 64)
    unfused = model(x)
    keys = list(model.state_dict())
    accelerate(model, training=False)
    assert type(model[0]) is NativeSwiGLU and list(model.state_dict()) == keys
    fused = model(x)
    assert torch.allclose(fused, unfused, rtol=1e-4, atol=1e-5)
    block = model[0]
    args = (block.gate_up.codes, block.gate_up.dm, block.down.codes, block.down.dm)
    portable = native.q4_1_swiglu_eager(x, *args, lib=portable_library)
    assert torch.allclose(portable, unfused, rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_()
    model(xg).sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_q4_1_quantisation_bounds_and_packing() -> None:
    """|w - (d q + m)| <= d / 2 (+ float16 rounding of m), codes in 0..15, packing lossless."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    codes, d, m = quantize_q4_1(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    approx = (codes.float().reshape(64, 4, 32) * d[..., None] + m[..., None]).reshape(64, 128)
    slack = (m.abs() * 2**-10).repeat_interleave(32, 1)
    assert ((approx - w).abs() <= d.repeat_interleave(32, 1) / 2 + slack + 1e-6).all()
    assert torch.equal(unpack_q4(pack_q4(codes)), codes)
    layer = BlockQ4Linear.from_codes(codes, d, m)
    assert torch.allclose(layer.dequantized_weight(), approx, rtol=0, atol=1e-6)


def test_q8_0_quantisation_bound() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    codes, d = quantize_q8_0(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    approx = (codes.float().reshape(64, 4, 32) * d[..., None]).reshape(64, 128)
    assert ((approx - w).abs() <= d.repeat_interleave(32, 1) * 0.501).all()


def test_fallback_and_gradients_use_the_dequantised_weight() -> None:
    """Without the native library (or when a gradient is needed) the layer is exactly
    x W~^T + b in PyTorch."""
    linear = nn.Linear(64, 48)
    layer = BlockQ4Linear.from_linear(linear)
    x = torch.randn(4, 64)
    exact = F.linear(x, layer.dequantized_weight(), layer.bias)
    layer.native = False
    assert torch.equal(layer(x), exact)
    layer.native = True
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, layer.dequantized_weight().sum(0).expand(4, 64), atol=1e-5)


def test_model_dtype_changes_leave_the_blocks_alone() -> None:
    """Constants are float16 bits in int16 buffers: ``.float()`` / ``.half()`` cannot touch them."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize_(model, "q4")
    before = model[0].dequantized_weight()
    model.half().float()
    assert torch.equal(model[0].dequantized_weight(), before)
    assert isinstance(model[2], BlockQ4Linear) and model[0].dm.dtype == torch.int16


def test_state_dict_round_trip(tmp_path: Path) -> None:
    """The block format is portable: saved and loaded, the layer is bit-identical."""
    from safetensors.torch import load_file, save_file

    q4, q8 = _layers()
    for layer, cls in ((q4, BlockQ4Linear), (q8, BlockQ8Linear)):
        save_file(layer.state_dict(), tmp_path / "w.safetensors")
        fresh = cls(layer.in_features, layer.out_features)
        fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))
        assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())


def test_widths_not_divisible_by_32_are_one_clear_error() -> None:
    with pytest.raises(LmarchError, match="cannot quantise '0' to q4: .*divisible by 32"):
        quantize_(nn.Sequential(nn.Linear(40, 8)), "q4")


def test_a_failed_build_is_reported(monkeypatch, tmp_path: Path) -> None:
    """No compiler: ``build`` raises with the reason (and ``native_library`` would warn and
    return None, leaving the layers on their PyTorch fallback)."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="cannot run the C compiler"):
        native.build([], tmp_path)


def test_q4_without_native_kernels_is_one_clear_error(monkeypatch) -> None:
    """Decoding through the dequantising fallback would be slower than float32: refuse it."""
    from lmarch.loading import load

    monkeypatch.setattr(native, "native_available", lambda: False)
    with pytest.raises(LmarchError, match="--quant q4 needs lmarch's native kernels"):
        load("smollm2-135m", quant="q4")
