"""Attention weights softmax(Q K^T / sqrt(d_k) + M) of one layer and head, for the playground.

The model runs unchanged; while it does, the attention function every
:class:`~lmarch.nn.attention.MultiHeadAttention` calls is wrapped so that the wanted layer's
call also writes out its weights from the (already rotated) queries and keys, the mask and the
scale it was given (Vaswani et al. 2017, eq. 1). Only calls from the calling thread are
recorded, so other threads using attention meanwhile are left alone.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import lmarch.nn.attention as attention_module
from lmarch.errors import LmarchError
from lmarch.nn.attention import attention_scale, causal_mask, repeat_kv


@dataclass
class _Recorder:
    layer: int
    head: int
    calls: int = 0
    n_heads: int = 0
    weights: Tensor | None = None
    owner: int = field(default_factory=threading.get_ident)


def _weights(call: dict) -> Tensor:
    """softmax(q k^T * scale + bias, masked) of one attention call's bound arguments ([B, H, T, T];
    key heads shared by groups of query heads; scores soft-capped first when the call asks)."""
    q, k, mask, bias = call["q"], call["k"], call.get("mask"), call.get("bias")
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * attention_scale(
        q.shape[-1], call.get("scale")
    )
    if call.get("softcap") is not None:  # Gemma 2's c tanh(s / c)
        scores = call["softcap"] * torch.tanh(scores / call["softcap"])
    if bias is not None:
        scores = scores + bias.float()
    allowed = causal_mask(q.shape[-2], k.shape[-2], q.device) if call.get("is_causal") else None
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    elif mask is not None:
        scores = scores + mask.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


@contextmanager
def _recording(recorder: _Recorder) -> Iterator[None]:
    original = attention_module.scaled_dot_product_attention
    signature = inspect.signature(original)

    def wrapped(*args: Any, **kwargs: Any) -> Tensor:
        if threading.get_ident() == recorder.owner:
            if recorder.calls == recorder.layer:
                call = signature.bind(*args, **kwargs).arguments
                q = call["q"]
                recorder.n_heads = q.shape[1]
                if recorder.head < q.shape[1]:
                    recorder.weights = _weights(call)[0, recorder.head]
            recorder.calls += 1
        return original(*args, **kwargs)

    attention_module.scaled_dot_product_attention = wrapped
    try:
        yield
    finally:
        attention_module.scaled_dot_product_attention = original


@torch.no_grad()
def attention_map(model: nn.Module, ids: list[int], layer: int, head: int) -> dict:
    """``{"weights": [T][T] floats, "n_layers", "n_heads"}``: row i is how token i spread its
    attention over tokens 0..i in layer ``layer``, head ``head`` (0-based)."""
    recorder = _Recorder(layer, head)
    x = torch.tensor([ids], dtype=torch.long)
    # with a cache the attention goes through the reference dispatch (native fused kernels
    # only take cache-free calls), which is what is wrapped
    cache = model.make_cache(1, len(ids)) if hasattr(model, "make_cache") else None
    was_training = model.training
    model.eval()
    try:
        with _recording(recorder):
            if cache is not None:
                model(x, cache=cache, start=0, last_only=True)
            else:
                model(x)
    finally:
        model.train(was_training)
    if recorder.calls == 0:
        raise LmarchError("this model has no attention layers to show")
    if layer >= recorder.calls:
        raise LmarchError(f"layer {layer} does not exist: the model has {recorder.calls} (0-based)")
    if recorder.weights is None:
        raise LmarchError(f"head {head} does not exist: layer {layer} has {recorder.n_heads}")
    return {
        "weights": [[round(w, 5) for w in row] for row in recorder.weights.tolist()],
        "n_layers": recorder.calls,
        "n_heads": recorder.n_heads,
    }


__all__ = ["attention_map"]
