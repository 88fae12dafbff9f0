"""Causal self-attention on lmarch's CPU kernel (attention.c) against PyTorch's SDPA in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmarch import native
from lmarch.native import accelerate
from lmarch.native import attention as native_attention
from lmarch.native.attention import (
    NativeCausalAttention,
    attention_backward,
    attention_forward,
    packed_causal_attention,
)
from lmarch.native.policy import NATIVE_MAX_LEN
from lmarch.nn.attention import MultiHeadAttention

pytestmark = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0)",
)

# float32 kernel against float64 SDPA: |error| / max|exact|; measured <= 2.9e-7 forward and
# <= 6e-7 backward over these shapes
TOLERANCE = 1e-5
SHAPES = [  # (B, T, H, H_kv, D)
    (12, 64, 4, 4, 32),  # the tiny GPT's training shape
    (2, 37, 6, 2, 16),  # grouped-query, T not a multiple of the 16-row tiles
    (3, 5, 4, 1, 16),  # multi-query
    (2, 200, 3, 3, 64),
    (1, 2, 2, 2, 16),
]


def _sdpa(qkv: torch.Tensor, heads: int, kv_heads: int, d: int) -> torch.Tensor:
    b, t, _ = qkv.shape
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = q.view(b, t, heads, d).transpose(1, 2)
    k = k.view(b, t, kv_heads, d).transpose(1, 2)
    v = v.view(b, t, kv_heads, d).transpose(1, 2)
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    return y.transpose(1, 2).reshape(b, t, heads * d)


def _error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return ((ours.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> object:
    return native.load(native.build([], tmp_path_factory.mktemp("kernels")))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_equal_sdpa(shape: tuple[int, ...]) -> None:
    b, t, heads, kv_heads, d = shape
    torch.manual_seed(0)
    exact_in = torch.randn(b, t, (heads + 2 * kv_heads) * d, dtype=torch.float64)
    grad = torch.randn(b, t, heads * d, dtype=torch.float64)
    ours_in = exact_in.float().requires_grad_()
    exact_in.requires_grad_()
    exact = _sdpa(exact_in, heads, kv_heads, d)
    exact.backward(grad)
    ours = packed_causal_attention(ours_in, heads, kv_heads, d)
    ours.backward(grad.float())
    assert _error(ours, exact) <= TOLERANCE
    assert _error(ours_in.grad, exact_in.grad) <= TOLERANCE


def test_portable_c_path_agrees(portable, monkeypatch) -> None:
    torch.manual_seed(1)
    qkv = torch.randn(2, 37, 10 * 16)
    grad = torch.randn(2, 37, 6 * 16)
    y, lse = attention_forward(qkv, 6, 2, 16)
    dqkv = attention_backward(qkv, y, lse, grad, 6, 2, 16)
    monkeypatch.setattr(native_attention, "native_library", lambda: portable)
    y2, lse2 = attention_forward(qkv, 6, 2, 16)
    dqkv2 = attention_backward(qkv, y2, lse2, grad, 6, 2, 16)
    assert _error(y2, y.double()) <= TOLERANCE and _error(dqkv2, dqkv.double()) <= TOLERANCE


def test_compiled_graphs_call_the_operator() -> None:
    torch.manual_seed(2)
    qkv = torch.randn(2, 24, 3 * 2 * 16, requires_grad=True)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return packed_causal_attention(x * 1.5, 2, 2, 16).square().sum()

    loss(qkv).backward()
    want = qkv.grad.clone()
    qkv.grad = None
    torch.compile(loss, backend="aot_eager", fullgraph=True)(qkv).backward()
    assert torch.allclose(qkv.grad, want, atol=1e-6, rtol=1e-5)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="float32 CPU qkv"):
        attention_forward(torch.randn(1, 4, 48, dtype=torch.float64), 1, 1, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        attention_forward(torch.randn(1, 4, 24), 1, 1, 8)


def _attention(**kw) -> MultiHeadAttention:
    """Attention with accelerate's swaps (the kernel's module where the policy takes it)."""
    torch.manual_seed(3)
    return accelerate(MultiHeadAttention(64, 4, **{"n_kv_heads": 2, **kw}), training=True)


@pytest.mark.parametrize("train", [True, False])
def test_multi_head_attention_takes_the_kernel_and_matches_reference(train, monkeypatch) -> None:
    calls = []
    real = native_attention._PackedCausalAttention.apply
    monkeypatch.setattr(
        native_attention._PackedCausalAttention,
        "apply",
        staticmethod(lambda *a: calls.append(1) or real(*a)),
    )
    fast, slow = _attention(), _attention(implementation="reference")
    assert type(fast) is NativeCausalAttention
    fast.train(train), slow.train(train)
    x = torch.randn(3, 20, 64, requires_grad=True)
    y_fast = fast(x)
    assert calls  # the kernel ran
    y_slow = slow(x)
    assert (y_fast - y_slow).abs().max().item() <= 1e-5
    if train:
        (g_fast,) = torch.autograd.grad(y_fast.sum(), x)
        (g_slow,) = torch.autograd.grad(y_slow.sum(), x)
        assert (g_fast - g_slow).abs().max().item() <= 1e-5


def test_other_calls_keep_pytorch(monkeypatch) -> None:
    monkeypatch.setattr(native_attention._PackedCausalAttention, "apply", None)  # must not run
    x = torch.randn(2, 8, 64)
    _attention()(x, attention_mask=torch.ones(2, 1, 1, 8, dtype=torch.bool))
    _attention(dropout=0.1).train()(x)
    _attention(n_kv_heads=4, head_dim=8)(x)  # head width not a multiple of 16
    _attention()(torch.randn(1, NATIVE_MAX_LEN + 1, 64))
    _attention()(x[:, :1])  # one token
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _attention()(x)  # the projection comes out in bf16
    late = _attention()
    late.implementation = "reference"  # changed after the swap: the call checks it
    late(x)


def test_only_attention_the_kernel_reproduces_is_swapped() -> None:
    """Structural checks at swap time: head width a multiple of 16, causal, the default scale."""
    assert type(_attention()) is NativeCausalAttention
    assert type(_attention(n_kv_heads=4, head_dim=8)) is MultiHeadAttention
    assert type(_attention(causal=False)) is MultiHeadAttention
    assert type(_attention(softmax_scale=1.0)) is MultiHeadAttention


def test_second_derivatives_equal_the_reference(monkeypatch) -> None:
    """create_graph=True through the kernel: the gradient penalty |d sum(y^2) / d qkv|^2 and its
    gradient equal the float64 reference (the backward recomputes with PyTorch's operators)."""
    torch.manual_seed(6)
    qkv = torch.randn(2, 19, 8 * 16, dtype=torch.float64)

    def penalty(x: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        value = g.square().sum()
        (dx,) = torch.autograd.grad(value, x)
        return value.detach(), dx

    reference = native_attention.reference_causal_attention
    assert _error(reference(qkv, 4, 2, 16), _sdpa(qkv, 4, 2, 16)) <= 1e-12  # the oracle
    want, want_dx = penalty(qkv, lambda x: reference(x, 4, 2, 16))
    got, got_dx = penalty(qkv.float(), lambda x: packed_causal_attention(x, 4, 2, 16))
    assert abs(got.item() - want.item()) / want.item() <= 1e-5
    assert _error(got_dx, want_dx) <= 1e-5
