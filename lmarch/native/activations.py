"""GELU-tanh on lmarch's CPU kernel (``activations.c``), differentiable and compilable.

``native_gelu_tanh(x)`` is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) for a float32 CPU
tensor: an autograd Function in eager code, the operator ``lmarch::gelu_tanh`` (with its
backward ``lmarch::gelu_tanh_backward``) inside graphs ``torch.compile`` traces, where Inductor
calls it as it is: its own CPU code for this activation is no faster than PyTorch's. Under
``create_graph=True`` (second derivatives) the eager backward is PyTorch's own GELU, so it is
differentiable again.

:func:`fast_gelu_tanh` is what :func:`lmarch.native.accelerate` puts in place of
:func:`lmarch.nn.ffn.gelu_tanh`: the kernel where :func:`lmarch.native.policy.gelu_call` says it
pays, PyTorch's GELU everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmarch.native import gelu_tanh_backward, gelu_tanh_forward
from lmarch.native.policy import gelu_call


class _NativeGeluTanh(torch.autograd.Function):
    """GELU-tanh forward and backward by ``activations.c`` (PyTorch's CPU kernel evaluates tanh
    one value at a time: ~4x slower, about a tenth of a small GPT's training step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return gelu_tanh_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            y = F.gelu(x, approximate="tanh")  # the saved x keeps its graph
            return torch.autograd.grad(y, x, grad, create_graph=True)[0]
        return gelu_tanh_backward(x, grad)


@torch.library.custom_op("lmarch::gelu_tanh", mutates_args=())
def _gelu_tanh_op(x: Tensor) -> Tensor:
    return gelu_tanh_forward(x)


@_gelu_tanh_op.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lmarch::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_backward_op(x: Tensor, grad: Tensor) -> Tensor:
    return gelu_tanh_backward(x, grad)


@_gelu_tanh_backward_op.register_fake
def _(x: Tensor, grad: Tensor) -> Tensor:
    return torch.empty_like(x)


def _save_input(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.save_for_backward(inputs[0])


_gelu_tanh_op.register_autograd(
    lambda ctx, grad: _gelu_tanh_backward_op(ctx.saved_tensors[0], grad),
    setup_context=_save_input,
)


def native_gelu_tanh(x: Tensor) -> Tensor:
    """GELU-tanh of a float32 CPU tensor on lmarch's kernel (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _gelu_tanh_op(x)
    return _NativeGeluTanh.apply(x)


def fast_gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU (:func:`lmarch.nn.ffn.gelu_tanh`, the same values to ~1e-7) on lmarch's
    kernel for large float32 CPU tensors, on ``F.gelu`` for everything else."""
    if gelu_call(x):
        return native_gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


__all__ = ["fast_gelu_tanh", "native_gelu_tanh"]
