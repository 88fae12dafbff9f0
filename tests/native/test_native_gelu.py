"""GELU-tanh on lmarch's native kernel (activations.c) against the equation in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmarch import native
from lmarch.native import activations as native_activations
from lmarch.native.activations import _NativeGeluTanh
from lmarch.native.activations import fast_gelu_tanh as gelu_tanh
from lmarch.native.policy import GELU_MIN_ELEMENTS as NATIVE_MIN_ELEMENTS

pytestmark = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0)",
)

# |ours - exact| / (1 + |x|) forward, / (1 + |grad|) backward; measured 1.1e-7 and 1.5e-7
# (PyTorch's own kernel: 8e-8 and 7.5e-7)
TOLERANCE = 3e-7


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 88.0, -88.0, 1e4, -1e4])
    return torch.cat([torch.linspace(-30, 30, 20001), torch.randn(50000) * 3, edges])


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> object:
    return native.load(native.build([], tmp_path_factory.mktemp("kernels")))


@pytest.mark.parametrize("build", ["simd", "portable"])
def test_forward_and_backward_equal_the_equation(build: str, portable) -> None:
    lib = native.native_library() if build == "simd" else portable
    x = _inputs()
    grad = torch.randn_like(x)
    exact_x = x.double().requires_grad_()
    exact = F.gelu(exact_x, approximate="tanh")
    exact.backward(grad.double())
    y = native.gelu_tanh_forward(x, lib)
    dx = native.gelu_tanh_backward(x, grad, lib)
    assert ((y.double() - exact).abs() / (1 + x.double().abs())).max().item() <= TOLERANCE
    assert ((dx.double() - exact_x.grad).abs() / (1 + grad.double().abs())).max() <= TOLERANCE


def test_autograd_uses_the_native_kernel_for_large_float32_tensors(monkeypatch) -> None:
    calls = []
    forward = native_activations.gelu_tanh_forward
    monkeypatch.setattr(
        native_activations, "gelu_tanh_forward", lambda x: calls.append(1) or forward(x)
    )
    x = torch.randn(4, NATIVE_MIN_ELEMENTS // 4, requires_grad=True)
    y = gelu_tanh(x)
    assert calls and y.grad_fn.name() == "_NativeGeluTanhBackward"
    y.sum().backward()
    reference = x.detach().double().requires_grad_()
    F.gelu(reference, approximate="tanh").sum().backward()
    assert (x.grad.double() - reference.grad).abs().max().item() <= TOLERANCE
    # non-contiguous input: the same values
    t = torch.randn(64, 128)[:, ::2]
    assert (gelu_tanh(t) - F.gelu(t, approximate="tanh")).abs().max().item() <= 1e-6


def test_small_and_half_precision_inputs_use_pytorch() -> None:
    small = torch.randn(8)
    assert torch.equal(gelu_tanh(small), F.gelu(small, approximate="tanh"))
    half = torch.randn(NATIVE_MIN_ELEMENTS, dtype=torch.bfloat16)
    assert torch.equal(gelu_tanh(half), F.gelu(half, approximate="tanh"))


def test_compiled_graphs_call_the_operator() -> None:
    x = torch.randn(NATIVE_MIN_ELEMENTS, requires_grad=True)
    gelu_tanh(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    graphs = []

    def backend(gm, inputs):  # type: ignore[no-untyped-def]
        graphs.append(str(gm.graph))
        return gm

    torch.compile(lambda t: gelu_tanh(t).square().sum(), backend=backend, fullgraph=True)(
        x
    ).backward()
    assert "lmarch.gelu_tanh" in graphs[0]
    assert torch.allclose(x.grad, want, atol=1e-6, rtol=1e-6)


def test_second_derivatives_equal_pytorch() -> None:
    """create_graph=True: the native backward is replaced by PyTorch's, so d/dx of the gradient
    is the GELU's second derivative (float64 oracle)."""
    x = torch.randn(NATIVE_MIN_ELEMENTS, requires_grad=True)
    (g,) = torch.autograd.grad(_NativeGeluTanh.apply(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    exact_x = x.detach().double().requires_grad_()
    (exact_g,) = torch.autograd.grad(
        F.gelu(exact_x, approximate="tanh").sum(), exact_x, create_graph=True
    )
    (exact_gg,) = torch.autograd.grad(exact_g.sum(), exact_x)
    assert (g.detach().double() - exact_g).abs().max().item() <= 1e-6
    assert (gg.double() - exact_gg).abs().max().item() <= 1e-6


def test_accelerate_swaps_gpt2_gelu_and_nothing_else() -> None:
    """Every ``act`` that is GPT-2's GELU becomes the native one; other activations stay."""
    from lmarch.native import accelerate
    from lmarch.nn.ffn import MLP
    from lmarch.nn.ffn import gelu_tanh as reference_gelu

    model = torch.nn.Sequential(MLP(8, 16, activation="gelu_tanh"), MLP(8, 16, activation="gelu"))
    assert model[0].act is reference_gelu
    accelerate(model, training=True)
    assert model[0].act is gelu_tanh and model[1].act is F.gelu
