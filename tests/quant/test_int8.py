"""Int8 weight-only linear layers and ``quantize_``.

Tolerance for layer outputs: the kernel rounds the activation to bfloat16 (8 significant bits,
relative rounding error <= 2^-9 ~ 0.002) and returns a bfloat16 result, so the output may differ
from x W~^T + b computed in float32 by a few tenths of a percent. We require
||y - y_ref|| / ||y_ref|| <= 1e-2 and max|y - y_ref| <= 1e-2 * max|y_ref|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmarch.errors import LmarchError
from lmarch.models import Llama, LlamaConfig
from lmarch.quant import Int8WeightOnlyLinear, quantize_
from lmarch.quant.int8 import int8_kernel_available

REL_TOL = 1e-2
# (in_features, out_features): SmolLM2-like; 576x4096 stands in for the 576x49152 head
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 4096)]


def bf16_round_up_reference(x: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 values up to bfloat16 by their bits: drop the low 16 mantissa bits,
    and if any of them was set, step the kept part up by one unit."""
    bits = x.float().contiguous().view(torch.int32)
    kept = bits & ~0xFFFF
    bumped = torch.where((bits & 0xFFFF) != 0, kept + 0x10000, kept)
    return bumped.view(torch.float32)


def int8_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row o: s_o = max|W_o| / 127 (rounded up to bf16; 1 for a zero row),
    q = round(W / s) in [-127, 127]; returns q, s and q * s, all float32."""
    w = weight.float()
    s = bf16_round_up_reference(w.abs().max(dim=1).values / 127)
    s[s == 0] = 1.0
    q = torch.round(w / s[:, None]).clamp(-127, 127)
    return q, s, q * s[:, None]


def make_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """GPT-like weights (std 0.02) with a few outliers, a row of zeros and a one-signed row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 1e-3] *= 20
    w[1] = 0.0
    w[2] = w[2].abs() + 0.5
    return w


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@pytest.fixture(scope="module")
def layers() -> dict[tuple[int, int], tuple[nn.Linear, Int8WeightOnlyLinear]]:
    out = {}
    for i, (k, n) in enumerate(SHAPES):
        lin = linear_with(make_weight(n, k, seed=i))
        out[(k, n)] = (lin, Int8WeightOnlyLinear.from_linear(lin))
    return out


def assert_close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    y, ref = y.float(), ref.float()
    assert (y - ref).norm() <= REL_TOL * ref.norm()
    assert (y - ref).abs().max() <= REL_TOL * ref.abs().max()


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of torch._weight_int8pack_mm made by the layer."""
    calls: list[int] = []
    real = torch._weight_int8pack_mm

    def counting(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", counting)
    return calls


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantized_weight_equals_reference(layers, shape) -> None:
    lin, layer = layers[shape]
    q, s, deq = int8_reference(lin.weight.detach())
    assert layer.qweight.dtype == torch.int8 and layer.scale.dtype == torch.bfloat16
    assert torch.equal(layer.qweight.float(), q)
    assert torch.equal(layer.scale.float(), s)
    assert torch.equal(layer.dequantized_weight(), deq)


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_error_within_half_a_step(layers, shape) -> None:
    lin, layer = layers[shape]
    err = (lin.weight.detach() - layer.dequantized_weight()).abs()
    half_step = layer.scale.float()[:, None] / 2
    assert (err <= half_step * (1 + 1e-6)).all()
    assert layer.qweight.abs().max() == 127  # the largest magnitude of a row sits on the grid edge
    assert torch.equal(layer.dequantized_weight()[1], torch.zeros(shape[0]))  # zero row exact


@pytest.mark.skipif(not int8_kernel_available(), reason="no int8 CPU kernel in this torch build")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("three_d", [False, True])
def test_output_matches_dequantized_matmul(layers, kernel_calls, shape, batch, three_d) -> None:
    lin, layer = layers[shape]
    k, n = shape
    g = torch.Generator().manual_seed(batch)
    x = torch.randn((2, batch, k) if three_d else (batch, k), generator=g)
    with torch.no_grad():
        y = layer(x)
    ref = x @ layer.dequantized_weight().t() + lin.bias.detach()
    assert y.shape == (*x.shape[:-1], n) and y.dtype == torch.float32
    assert kernel_calls, "the int8 kernel was not used"
    assert_close_bf16(y, ref)


def test_input_dtype_is_kept_and_bias_is_optional(layers, kernel_calls) -> None:
    lin, _ = layers[(576, 576)]
    layer = Int8WeightOnlyLinear.from_linear(linear_with(lin.weight.detach(), bias=False))
    x = torch.randn(3, 576)
    ref = x @ layer.dequantized_weight().t()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad():
            y = layer(x.to(dtype))
        assert y.dtype == dtype
        assert_close_bf16(y, ref)


def test_misaligned_bf16_input_is_safe() -> None:
    """A bf16 view that starts 2 bytes into a buffer would crash the kernel's aligned loads."""
    layer = Int8WeightOnlyLinear.from_linear(linear_with(make_weight(64, 576)))
    buf = torch.randn(577).to(torch.bfloat16)
    x = buf[1:].view(1, 576)
    assert x.data_ptr() % 64 != 0
    with torch.no_grad():
        y = layer(x)
    ref = x.float() @ layer.dequantized_weight().t() + layer.bias.detach()
    assert_close_bf16(y, ref)


def test_unsupported_width_falls_back(kernel_calls) -> None:
    """in_features not a multiple of 16: the plain path, exact in float32."""
    lin = linear_with(make_weight(24, 100))
    layer = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(5, 100)
    with torch.no_grad():
        y = layer(x)
    assert not kernel_calls
    assert torch.allclose(y, F.linear(x, layer.dequantized_weight(), lin.bias.detach()))


def test_gradient_flows_to_the_input() -> None:
    layer = Int8WeightOnlyLinear.from_linear(linear_with(make_weight(32, 64)))
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.dequantized_weight(), layer.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip(layers) -> None:
    _, layer = layers[(576, 1536)]
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "bias"}
    fresh = Int8WeightOnlyLinear(576, 1536)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 576)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


# -- quantize_ ---------------------------------------------------------------------------------


def tiny_llama(tied: bool = True) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        intermediate_size=352,
        tie_embeddings=tied,
    )
    return Llama(config).eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_quantize_replaces_every_linear_and_keeps_outputs_close() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    embedding = model.tok_emb.weight
    embedding_before = embedding.detach().clone()
    head_weight = model.lm_head.weight.detach().clone()

    assert quantize_(model, "int8") is model
    names = {n for n, m in model.named_modules() if isinstance(m, Int8WeightOnlyLinear)}
    expected = {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.out")}
    expected |= {f"blocks.{i}.ffn.{p}" for i in range(2) for p in ("gate_up", "down")}
    assert names == expected | {"lm_head"}
    assert not any(type(m) is nn.Linear for m in model.modules())
    # the tied embedding keeps its float weight; the head got its own quantised copy
    assert model.tok_emb.weight is embedding and torch.equal(embedding, embedding_before)
    _, _, deq = int8_reference(head_weight)
    assert torch.equal(model.lm_head.dequantized_weight(), deq)
    with torch.no_grad():
        out = model(ids)
    assert cosine(out, ref) >= 0.999


def test_quantize_skip_keeps_layers_in_float() -> None:
    model = tiny_llama()
    seen: list[str] = []

    def skip(name: str, linear: nn.Linear) -> bool:
        seen.append(name)
        return name == "lm_head" or linear.out_features < 200

    quantize_(model, "int8", skip=skip)
    assert "lm_head" in seen and "blocks.1.ffn.down" in seen
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    assert type(model.blocks[0].ffn.down) is nn.Linear  # 352 -> 128
    assert type(model.blocks[0].attn.out) is nn.Linear  # 128 -> 128
    assert isinstance(model.blocks[0].ffn.gate_up, Int8WeightOnlyLinear)  # 128 -> 704
    assert isinstance(model.blocks[0].attn.qkv, Int8WeightOnlyLinear)  # 128 -> 256


def test_quantize_shared_and_root_linears() -> None:
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_(model, "int8")
    assert isinstance(model[0], Int8WeightOnlyLinear) and model[0] is model[2]
    root = nn.Linear(32, 16)
    assert isinstance(quantize_(root, "int8"), Int8WeightOnlyLinear)


def test_quantize_rejects_unknown_scheme() -> None:
    with pytest.raises(LmarchError, match="scheme"):
        quantize_(nn.Sequential(nn.Linear(32, 32)), "int3")
