"""Python side of ``kquant.c``: products with weights in GGUF's Q4_K / Q5_K / Q6_K
super-blocks, as eager functions and as PyTorch operators (``torch.ops.lmarch.q4_k_matmul``,
``q5_k_matmul``, ``q6_k_matmul``) that ``torch.compile`` keeps as single opaque calls."""

from __future__ import annotations

import torch
from torch import Tensor

from lmarch.native import native_library

# ggml type name -> the exported function
KQUANT_FUNCTIONS = {
    "Q4_K": "lmarch_q4_k_matmul",
    "Q5_K": "lmarch_q5_k_matmul",
    "Q6_K": "lmarch_q6_k_matmul",
}


def kquant_matmul_eager(type_name: str, x: Tensor, blocks: Tensor, lib=None) -> Tensor:  # type: ignore[no-untyped-def]
    """y [M, N] = x W^T for x float [M, K] on the CPU and W [N, K] held as ``blocks`` uint8
    [N, K/256 * block bytes] of ``type_name`` ("Q4_K", "Q5_K" or "Q6_K"), as stored in a
    GGUF file;
    ``lib`` defaults to :func:`lmarch.native.native_library`."""
    lib = lib or native_library()
    if lib is None:
        raise RuntimeError("lmarch native kernels are not available")
    x = x.float().contiguous()
    blocks = blocks.contiguous()
    m, k = x.shape
    n = blocks.shape[0]
    y = torch.empty(m, n)
    if m == 0 or n == 0:
        return y
    fn = getattr(lib, KQUANT_FUNCTIONS[type_name])
    status = fn(x.data_ptr(), m, k, blocks.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError(f"{fn.__name__}: no memory for the quantised activations [{m}, {k}]")
    return y


def q4_k_matmul_eager(x: Tensor, blocks: Tensor) -> Tensor:
    """y = x W^T, W in Q4_K super-blocks (see :func:`kquant_matmul_eager`)."""
    return kquant_matmul_eager("Q4_K", x, blocks)


def q5_k_matmul_eager(x: Tensor, blocks: Tensor) -> Tensor:
    """y = x W^T, W in Q5_K super-blocks (see :func:`kquant_matmul_eager`)."""
    return kquant_matmul_eager("Q5_K", x, blocks)


def q6_k_matmul_eager(x: Tensor, blocks: Tensor) -> Tensor:
    """y = x W^T, W in Q6_K super-blocks (see :func:`kquant_matmul_eager`)."""
    return kquant_matmul_eager("Q6_K", x, blocks)


_LIBRARY = torch.library.Library("lmarch", "FRAGMENT")
for _name, _fn in (
    ("q4_k_matmul", q4_k_matmul_eager),
    ("q5_k_matmul", q5_k_matmul_eager),
    ("q6_k_matmul", q6_k_matmul_eager),
):
    _LIBRARY.define(f"{_name}(Tensor x, Tensor blocks) -> Tensor")
    _LIBRARY.impl(_name, _fn, "CPU")

    @torch.library.register_fake(f"lmarch::{_name}")
    def _fake(x: Tensor, blocks: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], blocks.shape[0], dtype=torch.float32)


KQUANT_OPS = {
    "Q4_K": torch.ops.lmarch.q4_k_matmul.default,
    "Q5_K": torch.ops.lmarch.q5_k_matmul.default,
    "Q6_K": torch.ops.lmarch.q6_k_matmul.default,
}

__all__ = [
    "KQUANT_FUNCTIONS",
    "KQUANT_OPS",
    "kquant_matmul_eager",
    "q4_k_matmul_eager",
    "q5_k_matmul_eager",
    "q6_k_matmul_eager",
]
