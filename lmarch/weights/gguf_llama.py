"""LLaMA-architecture GGUF files (llama.cpp's layout) -> lmarch's Llama.

Two conventions differ from the Hugging Face layout:
- tensor names (``blk.{i}.attn_q.weight`` ...) and separate q/k/v, gate/up, fused here;
- llama.cpp's converter permutes the rows of W_Q and W_K inside each head so that its RoPE
  rotates adjacent pairs (x_{2j}, x_{2j+1}); we rotate (x_j, x_{j+d/2}) as the HF layout does, so
  the permutation is undone on load:  rows (h, j, 2) -> (h, 2, j) for each head h.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.models.validate import ConfigError
from lmarch.nn.init import empty_weights
from lmarch.nn.position import MAX_ROTARY_POSITIONS
from lmarch.weights.gguf import GGUFFile, read_gguf
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import load_into_model


@functools.lru_cache(maxsize=64)
def _unpermuted_order(out_dim: int, n_heads: int) -> np.ndarray:
    """Row r of the unpermuted matrix is row ``order[r]`` of llama.cpp's: (h, t, j) <- (h, j, t)."""
    hd = out_dim // n_heads
    order = np.arange(out_dim).reshape(n_heads, hd // 2, 2).transpose(0, 2, 1).reshape(-1)
    order.flags.writeable = False
    return order


def unpermute_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's per-head row interleaving of a Q or K projection [n_heads*hd, ...]:
    rows (h, j, t) -> (h, t, j) for j < hd/2, t in {0, 1}.

    Works on any rows (float weights, or the raw bytes of quantised blocks: a row is an output
    feature either way). A plain CPU tensor is gathered by numpy in one pass with a cached row
    order (torch's reshape copy of many small matrices was most of a GGUF load's time, its
    threads spin-waiting on a busy machine); other tensors take the torch route."""
    out_dim = weight.shape[0]
    if weight.device.type == "cpu" and weight.dtype in _NUMPY_OK and not weight.requires_grad:
        order = _unpermuted_order(out_dim, n_heads)
        return torch.from_numpy(np.take(weight.numpy(), order, axis=0))
    hd = out_dim // n_heads
    return (
        weight.reshape(n_heads, hd // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(out_dim, *weight.shape[1:])
    )


# dtypes numpy shares with torch (not bfloat16)
_NUMPY_OK = frozenset(
    {
        torch.float32,
        torch.float16,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    }
)


def permute_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's interleaving (inverse of :func:`unpermute_rope_rows`)."""
    out_dim = weight.shape[0]
    hd = out_dim // n_heads
    return (
        weight.reshape(n_heads, 2, hd // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(out_dim, *weight.shape[1:])
    )


def gguf_llama_map(config: LlamaConfig) -> WeightMap:
    """Name map between llama.cpp's tensor names and ours for ``config``."""
    nh, nkv = config.n_head, config.kv_heads
    rules = [
        Rule("tok_emb.weight", "token_embd.weight"),
        Rule("blocks.{i}.norm_attn.weight", "blk.{i}.attn_norm.weight"),
        Rule(
            "blocks.{i}.attn.qkv.weight",
            ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
            load_fns=(
                lambda w: unpermute_rope_rows(w, nh),
                lambda w: unpermute_rope_rows(w, nkv),
                None,
            ),
            save_fns=(
                lambda w: permute_rope_rows(w, nh),
                lambda w: permute_rope_rows(w, nkv),
                None,
            ),
        ),
        Rule("blocks.{i}.attn.out.weight", "blk.{i}.attn_output.weight"),
        Rule("blocks.{i}.norm_ffn.weight", "blk.{i}.ffn_norm.weight"),
        Rule("blocks.{i}.ffn.gate_up.weight", ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight")),
        Rule("blocks.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight"),
        Rule("norm_f.weight", "output_norm.weight"),
    ]
    if not config.tie_embeddings:
        rules.append(Rule("lm_head.weight", "output.weight"))
    return WeightMap(rules, ignore=[r"^rope_freqs\.weight$"])


# Longest context a file may claim: the rotary tables are built for the whole context.
MAX_CONTEXT = MAX_ROTARY_POSITIONS


def _meta_number(gguf: GGUFFile, key: str, default: Any = None, *, whole: bool = True) -> Any:
    """Metadata ``llama.{key}``: a whole number >= 1 (``whole``) or a finite number > 0."""
    full = f"llama.{key}"
    value = gguf.metadata.get(full, default)
    if value is None:
        raise LmarchError(f"{gguf.path}: metadata key {full!r} is missing")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = number and math.isfinite(value)
    if whole and not (finite and value == int(value) and value >= 1):
        raise LmarchError(f"{gguf.path}: metadata {full}={value!r} must be a whole number >= 1")
    if not whole and not (finite and value > 0):
        raise LmarchError(f"{gguf.path}: metadata {full}={value!r} must be a number > 0")
    return int(value) if whole else float(value)


def _expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The PyTorch-order shape of every tensor a llama.cpp file of config ``c`` holds."""
    d, hd, ff = c.n_embd, c.dim_per_head, c.intermediate_size
    shapes = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,)}
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    layer = {
        "attn_norm.weight": (d,),
        "attn_q.weight": (c.n_head * hd, d),
        "attn_k.weight": (c.kv_heads * hd, d),
        "attn_v.weight": (c.kv_heads * hd, d),
        "attn_output.weight": (d, c.n_head * hd),
        "ffn_norm.weight": (d,),
        "ffn_gate.weight": (ff, d),
        "ffn_up.weight": (ff, d),
        "ffn_down.weight": (d, ff),
    }
    for i in range(c.n_layer):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _check_against_tensors(gguf: GGUFFile, c: LlamaConfig, explicit_head_dim: bool) -> None:
    """Compare the metadata with the tensors' shapes, naming the metadata key a mismatch
    points to; then every tensor's shape."""
    names = set(gguf.tensor_names)

    def shape(name: str) -> tuple[int, ...]:
        if name not in names:
            raise LmarchError(f"{gguf.path}: tensor {name!r} is missing")
        return gguf.tensor_info(name).shape

    def mismatch(key: str, value: Any, tensor: str, what: str) -> LmarchError:
        return LmarchError(
            f"{gguf.path}: metadata llama.{key}={value} contradicts tensor {tensor!r} of shape "
            f"{shape(tensor)} ({what})"
        )

    embd, q, k = (
        shape("token_embd.weight"),
        shape("blk.0.attn_q.weight"),
        shape("blk.0.attn_k.weight"),
    )
    if len(embd) != 2 or embd[1] != c.n_embd:
        raise mismatch("embedding_length", c.n_embd, "token_embd.weight", "its columns")
    if embd[0] != c.vocab_size:
        raise LmarchError(
            f"{gguf.path}: the vocabulary has {c.vocab_size} tokens (llama.vocab_size or "
            f"tokenizer.ggml.tokens) but 'token_embd.weight' has {embd[0]} rows"
        )
    layers = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
    if layers != set(range(c.n_layer)):
        found = max(layers) + 1 if layers else 0
        raise LmarchError(
            f"{gguf.path}: metadata llama.block_count={c.n_layer} contradicts the tensors, which "
            f"hold blocks 0..{found - 1}"
        )
    if shape("blk.0.ffn_gate.weight")[0] != c.intermediate_size:
        raise mismatch("feed_forward_length", c.intermediate_size, "blk.0.ffn_gate.weight", "rows")
    if q[0] != c.n_head * c.dim_per_head:
        detail = f"expects head_count x head width = {c.n_head} x {c.dim_per_head} rows"
        key = "attention.head_count" if not explicit_head_dim else "attention.key_length"
        value = c.n_head if not explicit_head_dim else c.dim_per_head
        raise mismatch(key, value, "blk.0.attn_q.weight", detail)
    if k[0] != c.kv_heads * c.dim_per_head:
        width = "attention.key_length" if explicit_head_dim else f"head_count={c.n_head}"
        detail = (
            f"expects head_count_kv x head width = {c.kv_heads} x {c.dim_per_head} rows, the "
            f"width from {width}"
        )
        raise mismatch("attention.head_count_kv", c.kv_heads, "blk.0.attn_k.weight", detail)
    for name, expected in _expected_shapes(c).items():
        if shape(name) != expected:
            raise LmarchError(
                f"{gguf.path}: tensor {name!r} has shape {shape(name)}, the metadata implies "
                f"{expected}"
            )


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    """The RoPE scaling llama.cpp applies for this file's metadata: a factor s (under
    ``rope.scaling.factor``, or ``rope.scale_linear`` in older files; 0 means none) divides every
    frequency unless the type is YaRN, which lmarch refuses; the type defaults to linear."""
    meta = gguf.metadata
    kind = meta.get("llama.rope.scaling.type", "linear")
    key = "rope.scaling.factor" if "llama.rope.scaling.factor" in meta else "rope.scale_linear"
    factor = meta.get(f"llama.{key}", 0.0)
    if factor == 0:
        factor = 1.0
    if kind not in ("none", "linear", "yarn"):
        raise LmarchError(
            f"{gguf.path}: metadata llama.rope.scaling.type={kind!r} is not supported"
        )
    if factor == 1:
        return None
    factor = _meta_number(gguf, key, whole=False)
    if kind != "linear":
        raise LmarchError(
            f"{gguf.path}: metadata llama.rope.scaling.type={kind!r} with llama.{key}={factor} "
            "is not supported"
        )
    return {"type": "linear", "factor": factor}


def llama_config_from_gguf(gguf: GGUFFile) -> LlamaConfig:
    """Our LlamaConfig from a GGUF file's ``llama.*`` metadata, checked against itself and against
    the tensors' shapes before any model is built: a contradiction is one :class:`LmarchError`
    naming the metadata key and its value."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LmarchError(
            f"{gguf.path}: architecture {arch!r} is not supported (only 'llama', 'gemma3')"
        )
    n_embd = _meta_number(gguf, "embedding_length")
    n_head = _meta_number(gguf, "attention.head_count")
    n_kv = _meta_number(gguf, "attention.head_count_kv", n_head)
    if n_head % n_kv:
        raise LmarchError(
            f"{gguf.path}: metadata llama.attention.head_count_kv={n_kv} must divide "
            f"llama.attention.head_count={n_head}"
        )
    explicit_head_dim = "llama.attention.key_length" in meta
    if not explicit_head_dim and n_embd % n_head:
        raise LmarchError(
            f"{gguf.path}: metadata llama.attention.head_count={n_head} does not divide "
            f"llama.embedding_length={n_embd}"
        )
    head_dim = _meta_number(gguf, "attention.key_length", n_embd // n_head)
    value_dim = _meta_number(gguf, "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise LmarchError(
            f"{gguf.path}: metadata llama.attention.value_length={value_dim} differs from the key "
            f"width {head_dim}; lmarch's attention needs them equal"
        )
    rotary = _meta_number(gguf, "rope.dimension_count", head_dim)
    if rotary % 2 or rotary > head_dim:
        raise LmarchError(
            f"{gguf.path}: metadata llama.rope.dimension_count={rotary} must be even and at most "
            f"the head width {head_dim}"
        )
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise LmarchError(
            f"{gguf.path}: no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)"
        )
    experts = meta.get("llama.expert_count", 0)
    if experts:
        raise LmarchError(
            f"{gguf.path}: metadata llama.expert_count={experts!r}: mixture-of-experts LLaMA files "
            "(Mixtral) are not supported"
        )
    scaling = _rope_scaling(gguf)
    if "rope_freqs.weight" in gguf.tensor_names:
        if scaling is not None:
            raise LmarchError(
                f"{gguf.path}: metadata llama.rope.scaling.factor and tensor "
                "'rope_freqs.weight' both rescale RoPE; lmarch applies one or the other"
            )
        freqs = gguf.tensor_info("rope_freqs.weight").shape
        if freqs != (rotary // 2,):
            raise LmarchError(
                f"{gguf.path}: tensor 'rope_freqs.weight' has shape {freqs}, the rotary width "
                f"{rotary} implies ({rotary // 2},)"
            )
        # llama.cpp divides each frequency by its factor (Llama 3.1's scaling, precomputed)
        scaling = {"type": "factors", "factors": gguf.load("rope_freqs.weight").tolist()}
    context = _meta_number(gguf, "context_length")
    if context > MAX_CONTEXT:
        raise LmarchError(
            f"{gguf.path}: metadata llama.context_length={context} is beyond {MAX_CONTEXT}: "
            "the rotary tables alone would not fit in memory"
        )
    try:
        config = LlamaConfig(
            vocab_size=vocab,
            block_size=context,
            n_layer=_meta_number(gguf, "block_count"),
            n_head=n_head,
            n_kv_head=n_kv,
            n_embd=n_embd,
            intermediate_size=_meta_number(gguf, "feed_forward_length"),
            head_dim=head_dim,
            rms_norm_eps=_meta_number(gguf, "attention.layer_norm_rms_epsilon", 1e-5, whole=False),
            rope_theta=_meta_number(gguf, "rope.freq_base", 10000.0, whole=False),
            rope_scaling=scaling,
            partial_rotary_factor=rotary / head_dim,
            tie_embeddings="output.weight" not in gguf.tensor_names,
        )
    except ConfigError as exc:  # a combination the checks above let through
        raise LmarchError(f"{gguf.path}: the metadata gives an invalid model: {exc}") from exc
    _check_against_tensors(gguf, config, explicit_head_dim)
    return config


def load_gguf_llama(
    path: str | Path, block_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Llama, GGUFFile]:
    """A Llama holding the (dequantised) weights of a llama.cpp GGUF file, and the file itself
    (its metadata carries the tokenizer and chat template).

    ``block_size`` caps the context length (the rotary table is built for it); default: the
    file's context length.
    """
    gguf = read_gguf(path)
    config = llama_config_from_gguf(gguf)
    if block_size is not None:
        config.block_size = min(block_size, config.block_size)
    with empty_weights():
        model = Llama(config)
    tensors = {name: gguf.load(name, dtype=dtype) for name in gguf.tensor_names}
    ours = gguf_llama_map(config).to_ours(tensors, config.n_layer, where=str(path))
    load_into_model(model, ours, source=str(path), assign=True)
    model.rotary.reset_tables("cpu")  # buffers are not in the file
    return model.eval(), gguf
