"""A Gemma 3 GGUF straight into block-quantised layers: every matrix kept exactly as stored.

llama.cpp's Gemma 3 files mix formats, because Gemma's width (640 for the 270M model) is not a
multiple of the K-quants' 256-weight super-block: a "Q4_K_M" file keeps ``attn_output`` (input
1024) and ``ffn_down`` (input 2048) in Q4_K / Q6_K, but ``attn_q``, ``attn_k``, ``ffn_gate`` and
``ffn_up`` (input 640) in Q5_0, ``attn_v`` and the 262,144-row embedding table in Q8_0.
Each has a layer that multiplies by its blocks natively, without rounding any weight again:

    Q4_K, Q5_K, Q6_K   -> :class:`~lmarch.quant.kquants.KQuantLinear`, bytes as stored
    Q8_0               -> :class:`~lmarch.quant.blockq.BlockQ8Linear`, codes and scales as stored
    Q5_0               -> BlockQ8Linear: x = d (q - 16) is Q8_0's x = d c with c = q - 16
                          (:func:`~lmarch.quant.gguf.q5_0_as_q8_0`), 8.5 bits a weight for 5.5
    Q4_0, Q4_1         -> :class:`~lmarch.quant.blockq.BlockQ4Linear`, as stored

A fused projection (``qkv``, ``gate_up``) whose parts share a layer kind is one layer; mixed
kinds make a :class:`~lmarch.quant.kquants.RowConcatLinear`. Tensors in other formats (float,
Q5_1, Q2_K, ...) are quantised to Q8_0. The tied output head and the embedding share one
Q8_0 table. Norm gains stay float32, and the config and name map are
:mod:`lmarch.weights.gguf_gemma`'s (the norms' stored ``1 + w`` is undone by the map).

The model runs the PyTorch Gemma layers with these modules in place of ``nn.Linear``; the
native fused decoder layers take LLaMA only (:mod:`lmarch.native.policy`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmarch.models.llama import Llama
from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear
from lmarch.quant.gguf import (
    _finish,
    _load_quantized,
    _map_rows,
    kquant_rows,
    one_thread,
    q4_blocks,
    q8_blocks,
    set_block_head,
    tied_table,
)
from lmarch.quant.kquants import NATIVE_KQUANTS, KQuantLinear, RowConcatLinear
from lmarch.weights.gguf import GGUFFile
from lmarch.weights.gguf_gemma import gemma3_config_from_gguf, gguf_gemma3_map
from lmarch.weights.name_map import Rule

# the stored formats each exact layer kind takes as they are
_Q8_EXACT = ("Q8_0", "Q5_0")
_Q4_EXACT = ("Q4_0", "Q4_1")


def layer_kind(type_name: str) -> str:
    """Which layer holds a tensor stored as ``type_name``: the K-quant's own name (its
    :class:`~lmarch.quant.kquants.KQuantLinear`), ``"q4"`` (Q4_0 / Q4_1 as Q4_1 blocks) or
    ``"q8"`` (Q8_0, Q5_0 re-encoded, and anything else quantised to Q8_0)."""
    if type_name in NATIVE_KQUANTS:
        return type_name
    return "q4" if type_name in _Q4_EXACT else "q8"


def exact_block_linear(gguf: GGUFFile, rule: Rule) -> nn.Module:
    """The layer for one name-map rule, each part's blocks kept as stored (see the module
    docstring); parts of different kinds become a RowConcatLinear of one layer a part."""
    kinds = {layer_kind(gguf.tensor_info(name).type_name) for name in rule.parts}
    if len(kinds) > 1:
        fns = rule.load_fns or (None,) * len(rule.parts)
        return RowConcatLinear(
            [
                exact_block_linear(gguf, Rule(rule.ours, name, load_fns=(fn,)))
                for name, fn in zip(rule.parts, fns)
            ]
        )
    kind = kinds.pop()
    if kind in NATIVE_KQUANTS:
        rows = [kquant_rows(gguf, name) for name in rule.parts]
        if all(r is not None for r in rows):
            return KQuantLinear.from_blocks(_map_rows(rule, rows), kind)  # type: ignore[arg-type]
        kind = "q8"  # a 1-D or odd-shaped K-quant tensor: quantised to Q8_0 below
    make = q4_blocks if kind == "q4" else q8_blocks
    pieces = [make(gguf, name) for name in rule.parts]
    a, b = (_map_rows(rule, [p[j] for p in pieces]) for j in range(2))
    return BlockQ4Linear.from_blocks(a, b) if kind == "q4" else BlockQ8Linear.from_blocks(a, b)


def load_gguf_gemma3_blocks(
    path: str | Path, block_size: int | None = None
) -> tuple[Llama, GGUFFile]:
    """A Llama with Gemma 3's options whose every matrix holds the file's own blocks
    (:func:`exact_block_linear`; the tied head and embedding one Q8_0 table), norms in
    float32, and the file (its metadata carries the vocabulary). ``block_size`` caps the
    context, as for :func:`lmarch.weights.gguf_gemma.load_gguf_gemma3`."""
    with one_thread():  # many small operations: see one_thread
        model, gguf, _ = _load_quantized(
            path,
            block_size,
            exact_block_linear,
            torch.float32,
            skip=tied_table,
            read_config=gemma3_config_from_gguf,
            name_map=gguf_gemma3_map,
        )
        set_block_head(model, gguf, path)
        return _finish(model, path, torch.float32), gguf


__all__ = ["exact_block_linear", "layer_kind", "load_gguf_gemma3_blocks"]
