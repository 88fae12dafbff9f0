"""A SwiGLU feed-forward block over Q4_1 layers as one native call (``blockq.c``).

    SwiGLU(x) = W_down (SiLU(W_gate x) * (W_up x))        (Shazeer 2020)

:class:`NativeSwiGLU` is the :class:`~lmarch.nn.ffn.GatedMLP` that :func:`lmarch.native.accelerate`
swaps in (``training=False``) when both of its layers are
:class:`~lmarch.quant.blockq.BlockQ4Linear` without biases: on CPU inference the whole block is
one call (one parallel region, no intermediate tensors); otherwise it runs the reference forward,
the two quantised layers with PyTorch in between.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmarch import native
from lmarch.native.policy import swiglu_call
from lmarch.nn.ffn import GatedMLP


class NativeSwiGLU(GatedMLP):
    """A :class:`~lmarch.nn.ffn.GatedMLP` (same submodules, same state dict) over two Q4_1
    layers, ``gate_up`` [2H, K] (gate rows first) and ``down`` [K, H]."""

    def forward(self, x: Tensor) -> Tensor:
        """x [..., K] -> [..., K]."""
        if not swiglu_call(self, x):
            return super().forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        args = (self.gate_up.codes, self.gate_up.dm, self.down.codes, self.down.dm)
        if torch.compiler.is_compiling():
            y = native.q4_1_swiglu(x2, *args)
        else:
            y = native.q4_1_swiglu_eager(x2, *args)
        return y.to(x.dtype).view(*lead, -1)


__all__ = ["NativeSwiGLU"]
