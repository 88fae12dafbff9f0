"""Quantise a model in place: every ``nn.Linear`` becomes a weight-only int8, int4, Q8_0,
Q4_1 or NF4 layer.

Any family works, because the swap happens from outside the model: the model file keeps its
``nn.Linear`` layers, and ``quantize_`` walks the module tree and replaces them.

    model = quantize_(model, "int4", group_size=32, skip=lambda name, m: name == "lm_head")
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmarch.errors import LmarchError
from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear, check_block_shape
from lmarch.quant.int4 import Int4WeightOnlyLinear, check_int4_shape
from lmarch.quant.int8 import Int8WeightOnlyLinear
from lmarch.quant.nf4 import NF4Linear, check_nf4
from lmarch.quant.q4_0 import q4_0_linear

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "SCHEMES",
    "quantize_",
    "quantize_for_decoding",
    "quantize_linear",
    "quantized_like",
    "restore_quantized_",
]

SCHEMES = ("int8", "int4", "q8", "q4", "q4_0", "nf4")
# the group (block) size a scheme takes when none is given
DEFAULT_GROUP_SIZE = {"int4": 32, "nf4": 64}

SkipFn = Callable[[str, nn.Linear], bool]


def quantize_linear(
    linear: nn.Linear, scheme: str = "int8", group_size: int | None = None
) -> nn.Module:
    """One ``nn.Linear`` as its quantised counterpart (``linear`` itself is not changed).
    ``group_size`` (int4's group, NF4's block) defaults to :data:`DEFAULT_GROUP_SIZE`."""
    group_size = group_size or DEFAULT_GROUP_SIZE.get(scheme, 32)
    if scheme == "int8":
        return Int8WeightOnlyLinear.from_linear(linear)
    if scheme == "int4":
        return Int4WeightOnlyLinear.from_linear(linear, group_size=group_size)
    if scheme == "nf4":
        return NF4Linear.from_linear(linear, block_size=group_size)
    if scheme == "q8":
        return BlockQ8Linear.from_linear(linear)
    if scheme == "q4":
        return BlockQ4Linear.from_linear(linear)
    if scheme == "q4_0":
        return q4_0_linear(linear)
    raise LmarchError(f"unknown quantisation scheme {scheme!r}", hint=f"choose one of {SCHEMES}")


def quantize_(
    model: nn.Module,
    scheme: str = "int8",
    group_size: int | None = None,
    skip: SkipFn | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a weight-only quantised layer, in place.

    ``scheme`` is ``"int8"`` (per-output-channel) or ``"int4"`` (groups of ``group_size``
    inputs), both on PyTorch's kernels, or ``"q8"`` / ``"q4"`` / ``"q4_0"``: llama.cpp's Q8_0 /
    Q4_1 / Q4_0 blocks of 32 inputs on lmarch's native kernels (:mod:`lmarch.quant.blockq`,
    :mod:`lmarch.quant.q4_0`), or ``"nf4"``:
    QLoRA's NormalFloat blocks of ``group_size`` (default 64) with double-quantised scales,
    dequantised on the fly (:mod:`lmarch.quant.nf4`). ``skip(name, linear)`` returning True keeps that layer in float; ``name`` is the
    dotted module path (``"blocks.0.ffn.down"``, ``"lm_head"``).

    Only exact ``nn.Linear`` instances are replaced: subclasses (such as the ``out_proj`` of
    ``nn.MultiheadAttention``, whose parent reads the raw weight) are left alone. A layer
    reached under several names is quantised once and stays shared. A Linear whose weight is
    tied to an ``nn.Embedding`` (an output head sharing the token embeddings) gets its own
    quantised copy; the embedding keeps the float weight, since a lookup table reads single
    rows and gains nothing from the matmul kernels.

    Every layer is checked before any is replaced, so a layer int4 cannot take (in_features
    not divisible by ``group_size``) raises ``LmarchError`` naming it and leaves the model
    untouched. Returns ``model`` — or the new layer, if ``model`` is itself an ``nn.Linear``.
    """
    if scheme not in SCHEMES:
        raise LmarchError(
            f"unknown quantisation scheme {scheme!r}", hint=f"choose one of {SCHEMES}"
        )
    group_size = group_size or DEFAULT_GROUP_SIZE.get(scheme, 32)
    if type(model) is nn.Linear:
        if skip is not None and skip("", model):
            return model
        return quantize_linear(model, scheme, group_size)

    # (parent, attribute, child, dotted name) for every place a Linear hangs in the tree
    sites: list[tuple[nn.Module, str, nn.Linear, str]] = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() would drop repeats
            if type(child) is nn.Linear:
                name = f"{parent_name}.{attr}" if parent_name else attr
                sites.append((parent, attr, child, name))

    chosen: dict[int, nn.Linear] = {}  # id -> layer, first name decides skip
    decided: set[int] = set()
    for _, _, child, name in sites:
        if id(child) in decided:
            continue
        decided.add(id(child))
        if skip is not None and skip(name, child):
            continue
        try:
            if scheme == "int4":
                check_int4_shape(child.in_features, child.out_features, group_size)
            elif scheme in ("q8", "q4", "q4_0"):
                check_block_shape(child.in_features)
            elif scheme == "nf4":
                check_nf4(child.weight, group_size)
        except LmarchError as err:
            raise LmarchError(
                f"cannot quantise {name!r} to {scheme}: {err.args[0]}",
                hint=f"keep it in float with skip=lambda name, m: name == {name!r}, "
                "or choose another group size",
            ) from None
        chosen[id(child)] = child

    replacements = {key: quantize_linear(lin, scheme, group_size) for key, lin in chosen.items()}
    for parent, attr, child, _ in sites:
        if id(child) in replacements:
            setattr(parent, attr, replacements[id(child)])
    return model


def quantized_like(linear: nn.Linear, scheme: str, group_size: int | None = None) -> nn.Module:
    """An empty quantised layer of ``linear``'s shape and kind (the codes and constants its
    ``load_state_dict`` will fill): how a model saved quantised is rebuilt without quantising
    the freshly initialised float weights first."""
    group_size = group_size or DEFAULT_GROUP_SIZE.get(scheme, 32)
    shape = (linear.in_features, linear.out_features)
    bias = linear.bias is not None
    if scheme == "int8":
        return Int8WeightOnlyLinear(*shape, bias=bias)
    if scheme == "int4":
        # built on "meta" and given plain buffers: the kernel packing happens once, on load
        layer = Int4WeightOnlyLinear(*shape, bias=bias, group_size=group_size, device="meta")
        layer.qweight = torch.empty(linear.out_features, linear.in_features // 2, dtype=torch.uint8)
        layer.scales_and_zeros = torch.empty_like(layer.scales_and_zeros, device="cpu")
        if bias:
            layer.bias = nn.Parameter(torch.empty(linear.out_features))
        return layer
    if scheme == "q8":
        return BlockQ8Linear(*shape, bias=bias)
    if scheme in ("q4", "q4_0"):
        return BlockQ4Linear(*shape, bias=bias)
    if scheme == "nf4":
        return NF4Linear(*shape, bias=bias, block_size=group_size)
    raise LmarchError(f"unknown quantisation scheme {scheme!r}", hint=f"choose one of {SCHEMES}")


def restore_quantized_(
    model: nn.Module, scheme: str, group_size: int | None, names: list[str]
) -> nn.Module:
    """Replace the ``nn.Linear`` layers called ``names`` by empty layers of ``scheme``
    (:func:`quantized_like`), in place, so that the state dict of a model that
    :func:`quantize_` quantised loads into it. A name that is not an ``nn.Linear`` of the
    model raises ``LmarchError``."""
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if type(layer) is not nn.Linear:
            raise LmarchError(f"the model has no Linear layer {name!r} to hold {scheme} weights")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                quantized_like(layer, scheme, group_size))  # fmt: skip
    return model


def quantize_for_decoding(model: nn.Module, scheme: str) -> nn.Module:
    """Make a float model fast to decode on a CPU, in place: ``"int8"`` / ``"int4"`` replace
    every Linear (output head included) by a weight-only layer on PyTorch's kernels and switch
    the model to bfloat16, the only activation type those kernels are fast with; ``"q8"`` /
    ``"q4"`` use llama.cpp's block formats (float32 activations; the native layers that run
    them are swapped in afterwards by :func:`lmarch.load`); ``"none"`` leaves it as it is."""
    if scheme == "none":
        return model
    if scheme in ("int8", "int4"):
        model.to(torch.bfloat16)
    return quantize_(model, scheme)
