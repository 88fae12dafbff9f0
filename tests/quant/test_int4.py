"""Int4 group-wise weight-only linear layers.

Tolerance for layer outputs, as for int8: the kernel rounds the activation and the result to
bfloat16 (relative rounding <= 2^-9), so we require ||y - y_ref|| / ||y_ref|| <= 1e-2 and
max|y - y_ref| <= 1e-2 * max|y_ref|, with y_ref = x W~^T + b computed in float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmarch.errors import LmarchError
from lmarch.models import Llama, LlamaConfig
from lmarch.nn.ffn import GatedMLP
from lmarch.quant import Int4WeightOnlyLinear, pack_int4, quantize_, unpack_int4
from lmarch.quant.int4 import int4_kernel_available

REL_TOL = 1e-2
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 4096)]  # (in_features, out_features)
# every shape with group 32; 64 and 128 where in_features allows (576 = 4.5 * 128)
SHAPE_GROUPS = [(s, 32) for s in SHAPES] + [((576, 1536), 64), ((1536, 576), 128)]

needs_kernel = pytest.mark.skipif(
    not int4_kernel_available(), reason="no int4 CPU kernel in this torch build"
)


def bf16_round_up_reference(x: torch.Tensor) -> torch.Tensor:
    """Positive fp32 -> the next bfloat16 at or above it, by clearing/bumping the low 16 bits."""
    bits = x.float().contiguous().view(torch.int32)
    kept = bits & ~0xFFFF
    return torch.where((bits & 0xFFFF) != 0, kept + 0x10000, kept).view(torch.float32)


def int4_reference(weight: torch.Tensor, group_size: int):
    """Per group of ``group_size`` inputs: s = (hi - lo)/15, z = bf16(lo + 8 s), s widened if z's
    rounding moved the grid by more than s/2, s rounded up to bf16 (1 for a constant group),
    q = round((W - z)/s) + 8 in [0, 15]. Returns codes [N, K], scales [N, K/G], zeros [N, K/G]
    and W~ = (q - 8) s + z, all float32."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.min(dim=-1).values, groups.max(dim=-1).values
    s = (hi - lo) / 15
    z = (lo + 8 * s).to(torch.bfloat16).float()
    s = torch.stack([s, (z - lo) / 8.5, (hi - z) / 7.5]).max(dim=0).values
    s = bf16_round_up_reference(s)
    s[s == 0] = 1.0
    q = (torch.round((groups - z[..., None]) / s[..., None]) + 8).clamp(0, 15)
    deq = (q - 8) * s[..., None] + z[..., None]
    return q.reshape(n, k), s, z, deq.reshape(n, k)


def make_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """GPT-like weights (std 0.02) with outliers, a zero row, a one-signed row, and a narrow
    group far from zero (where rounding the zero point to bf16 forces a wider step)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 1e-3] *= 20
    w[1] = 0.0
    w[2] = w[2].abs() + 0.5
    w[3, :32] = 100.0 + torch.linspace(0, 0.01, 32)
    return w


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@dataclass
class Case:
    linear: nn.Linear
    layer: Int4WeightOnlyLinear
    deq: torch.Tensor  # the layer's dequantized_weight(), read once (it runs the kernel)
    reference: tuple  # int4_reference(weight, group)


@pytest.fixture(scope="module")
def layers() -> dict[tuple, Case]:
    out = {}
    for i, (shape, group) in enumerate(SHAPE_GROUPS):
        k, n = shape
        lin = linear_with(make_weight(n, k, seed=i))
        layer = Int4WeightOnlyLinear.from_linear(lin, group_size=group)
        ref = int4_reference(lin.weight.detach(), group)
        out[(shape, group)] = Case(lin, layer, layer.dequantized_weight(), ref)
    return out


def assert_close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    y, ref = y.float(), ref.float()
    assert (y - ref).norm() <= REL_TOL * ref.norm()
    assert (y - ref).abs().max() <= REL_TOL * ref.abs().max()


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = torch._weight_int4pack_mm_for_cpu

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", counting)
    return calls


@pytest.mark.parametrize(("shape", "group"), SHAPE_GROUPS)
def test_dequantized_weight_equals_reference(layers, shape, group) -> None:
    case = layers[(shape, group)]
    codes, scales, zeros, deq = case.reference
    sz = case.layer.scales_and_zeros
    assert sz.shape == (shape[0] // group, shape[1], 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 0].float().t(), scales)
    assert torch.equal(sz[..., 1].float().t(), zeros)
    assert torch.equal(case.deq, deq)
    assert torch.equal(case.layer.codes().float(), codes)


@pytest.mark.parametrize(("shape", "group"), SHAPE_GROUPS)
def test_weight_error_within_half_a_step(layers, shape, group) -> None:
    case = layers[(shape, group)]
    weight = case.linear.weight.detach()
    err = (weight - case.deq).abs()
    step = case.layer.scales_and_zeros[..., 0].float().t().repeat_interleave(group, dim=1)
    # s/2, plus fp32 rounding of (q - 8) s + z (a few ulps of |W|)
    assert (err <= step / 2 * (1 + 1e-6) + 1e-6 * weight.abs()).all()
    codes = case.reference[0]
    assert codes.min() == 0 and codes.max() == 15
    assert torch.equal(case.deq[1], torch.zeros(shape[0]))  # the zero row is exact


def test_zero_point_rounding_widens_the_step() -> None:
    """The group [100, 100.01]: z = bf16(100.005) = 100, so (hi - lo)/15 would miss hi."""
    layer = Int4WeightOnlyLinear.from_linear(linear_with(make_weight(16, 64)))
    s, z = layer.scales_and_zeros[0, 3].float()
    assert z == 100.0 and s > 0.01 / 15
    w = make_weight(16, 64)[3, :32]
    assert ((w - layer.dequantized_weight()[3, :32]).abs() <= s / 2).all()


@needs_kernel
@pytest.mark.parametrize(("shape", "group"), SHAPE_GROUPS)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("three_d", [False, True])
def test_output_matches_dequantized_matmul(
    layers, kernel_calls, shape, group, batch, three_d
) -> None:
    case = layers[(shape, group)]
    layer = case.layer
    k, n = shape
    g = torch.Generator().manual_seed(batch)
    x = torch.randn((2, batch, k) if three_d else (batch, k), generator=g)
    with torch.no_grad():
        y = layer(x)
    ref = x @ case.deq.t() + case.linear.bias.detach()
    assert layer.kernel_packed and kernel_calls, "the int4 kernel was not used"
    assert y.shape == (*x.shape[:-1], n) and y.dtype == torch.float32
    assert_close_bf16(y, ref)


def test_input_dtype_is_kept(layers) -> None:
    case = layers[((576, 576), 32)]
    layer = case.layer
    x = torch.randn(3, 576)
    ref = x @ case.deq.t() + layer.bias.detach()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad():
            y = layer(x.to(dtype))
        assert y.dtype == dtype
        assert_close_bf16(y, ref)


def test_outputs_not_multiple_of_16_fall_back(kernel_calls) -> None:
    lin = linear_with(make_weight(40, 64))
    layer = Int4WeightOnlyLinear.from_linear(lin)
    assert not layer.kernel_packed
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x)
    assert not kernel_calls
    deq = int4_reference(lin.weight.detach(), 32)[3]
    assert torch.equal(layer.dequantized_weight(), deq)
    assert torch.allclose(y, F.linear(x, deq, lin.bias.detach()), rtol=1e-6, atol=1e-6)


def test_gradient_flows_to_the_input() -> None:
    layer = Int4WeightOnlyLinear.from_linear(linear_with(make_weight(32, 64)))
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.dequantized_weight(), layer.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("in_features", "group", "message"),
    [(576, 128, "divisible"), (64, 16, "group size"), (64, 48, "group size")],
)
def test_invalid_group_sizes_are_refused(in_features, group, message) -> None:
    with pytest.raises(LmarchError, match=message):
        Int4WeightOnlyLinear.from_linear(nn.Linear(in_features, 32), group_size=group)


def test_pack_unpack_round_trip() -> None:
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (48, 48)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)
    assert torch.equal(unpack_int4(packed), q)


def test_state_dict_holds_the_portable_packing(layers) -> None:
    case = layers[((576, 1536), 64)]
    layer = case.layer
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scales_and_zeros", "bias"}
    assert torch.equal(sd["qweight"], pack_int4(case.reference[0].to(torch.uint8)))
    fresh = Int4WeightOnlyLinear(576, 1536, group_size=64)
    fresh.load_state_dict(sd)
    assert fresh.kernel_packed == layer.kernel_packed
    x = torch.randn(2, 576)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantized_weight(), case.deq)


def test_dtype_casts_and_device_moves_keep_the_weight(layers) -> None:
    case = layers[((576, 576), 32)]
    layer = copy.deepcopy(case.layer)
    layer.to(torch.bfloat16).float()
    assert layer.kernel_packed
    assert torch.equal(layer.dequantized_weight(), case.deq)
    layer.to("meta")  # leaving the CPU: back to the portable packing, which is what moves
    assert not layer.kernel_packed and layer.qweight.device.type == "meta"
    assert layer.qweight.shape == (576, 288)


def test_quantize_int4_model_outputs_stay_close() -> None:
    torch.manual_seed(0)
    mlp = GatedMLP(256, 704, "silu").eval()
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        ref = mlp(x)
    quantize_(mlp, "int4", group_size=32)
    assert isinstance(mlp.gate_up, Int4WeightOnlyLinear) and isinstance(
        mlp.down, Int4WeightOnlyLinear
    )
    with torch.no_grad():
        out = mlp(x)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) >= 0.99

    config = LlamaConfig(
        vocab_size=256,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        intermediate_size=352,
        tie_embeddings=True,
    )
    torch.manual_seed(0)
    model = Llama(config).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    embedding = model.tok_emb.weight.detach().clone()
    quantize_(model, "int4", group_size=32)
    assert sum(isinstance(m, Int4WeightOnlyLinear) for m in model.modules()) == 9
    assert torch.equal(model.tok_emb.weight, embedding)
    with torch.no_grad():
        out = model(ids)
    # nine quantised layers in a row (each alone keeps cosine ~0.998 on random weights, the
    # attention layers of a random model amplify the noise most): a looser bar than one MLP
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) >= 0.98


def test_quantize_int4_names_the_layer_it_cannot_take() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 100), nn.Linear(100, 64))
    with pytest.raises(LmarchError, match="'2'") as info:
        quantize_(model, "int4", group_size=32)
    assert "skip" in str(info.value)
    assert all(type(m) is nn.Linear for m in model)  # nothing replaced
    quantize_(model, "int4", skip=lambda name, m: name == "2")
    assert isinstance(model[0], Int4WeightOnlyLinear) and type(model[2]) is nn.Linear
