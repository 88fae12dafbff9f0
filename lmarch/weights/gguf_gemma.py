"""Gemma 3 GGUF files (llama.cpp's ``gemma3`` architecture) -> lmarch's Llama with Gemma's options.

Gemma 3 (Gemma Team 2025) is the LLaMA decoder with the variants of :mod:`lmarch.models.llama`
switched on: embeddings times sqrt(d), RMSNorm gains applied as (1 + w), norms before *and* after
each sublayer, GeGLU, QK-norm, and five sliding-window ("local") layers for every global one, the
local layers rotating with their own RoPE base. A GGUF file says some of this in its
``gemma3.*`` metadata; the rest llama.cpp takes as fixed for the architecture, and so do we:

    metadata key                        ours                 when the file is silent
    block_count, embedding_length ...   the shapes           (required)
    attention.key_length                head_dim             embedding_length / head_count
    attention.sliding_window            sliding_window       (required)
    attention.sliding_window_pattern    layer_types          every 6th layer global
    rope.freq_base                      rope_theta (global)  1e6
    rope.freq_base_swa                  rope_local_theta     1e4
    rope.scaling.type / .factor         rope_scaling         none (linear only; global layers)
    attention.layer_norm_rms_epsilon    rms_norm_eps         1e-6
    -                                   query_pre_attn_scalar  head_dim (n_embd / n_head for 27B)

Two storage conventions differ from the Hugging Face layout:
- llama.cpp's converter stores every Gemma norm gain with the 1 already added (w + 1); we keep
  Gemma's (1 + w) form, so 1 is subtracted on load, exactly as ``transformers`` does;
- q and k are *not* permuted (Gemma rotates halves, "NEOX" order, as lmarch does).

Any other ``gemma3.*`` key is refused by name rather than ignored.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

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

ARCH = "gemma3"
_GGUF_STRING = 8  # GGUF value type of a string
# Positions the rotary tables are built for when the caller names no context: Gemma 3 claims
# 32k (270M) to 128k, and two tables of head width 256 at 32k are ~64 MB each in float32.
DEFAULT_BLOCK_SIZE = 8192
GLOBAL_EVERY = 6  # llama.cpp's fixed pattern for gemma3: layers 6, 12, ... attend globally

_KNOWN = {
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "attention.layer_norm_rms_epsilon", "attention.sliding_window",
    "attention.sliding_window_pattern", "rope.freq_base", "rope.freq_base_swa",
    "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor", "vocab_size",
}  # fmt: skip


def _plus_one(w: Tensor) -> Tensor:
    return w + 1


def _minus_one(w: Tensor) -> Tensor:
    return w - 1


def _norm(ours: str, theirs: str) -> Rule:
    """A norm gain: llama.cpp stores w + 1, ours is w (the model applies 1 + w)."""
    return Rule(ours, theirs, load_fns=(_minus_one,), save_fns=(_plus_one,))


def gguf_gemma3_map(config: LlamaConfig) -> WeightMap:
    """Name map between llama.cpp's ``gemma3`` tensor names and ours for ``config``."""
    rules = [
        Rule("tok_emb.weight", "token_embd.weight"),
        _norm("blocks.{i}.norm_attn.weight", "blk.{i}.attn_norm.weight"),
        Rule(
            "blocks.{i}.attn.qkv.weight",
            ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
        ),
        _norm("blocks.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
        _norm("blocks.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
        Rule("blocks.{i}.attn.out.weight", "blk.{i}.attn_output.weight"),
        _norm("blocks.{i}.post_norm_attn.weight", "blk.{i}.post_attention_norm.weight"),
        _norm("blocks.{i}.norm_ffn.weight", "blk.{i}.ffn_norm.weight"),
        Rule("blocks.{i}.ffn.gate_up.weight", ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight")),
        Rule("blocks.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight"),
        _norm("blocks.{i}.post_norm_ffn.weight", "blk.{i}.post_ffw_norm.weight"),
        _norm("norm_f.weight", "output_norm.weight"),
    ]
    if not config.tie_embeddings:
        rules.append(Rule("lm_head.weight", "output.weight"))
    return WeightMap(rules)


def _number(gguf: GGUFFile, key: str, default: Any = None, *, whole: bool = True) -> Any:
    """Metadata ``gemma3.{key}``: a whole number >= 1 (``whole``) or a finite number > 0."""
    full = f"{ARCH}.{key}"
    value = gguf.metadata.get(full, default)
    if value is None:
        raise LmarchError(f"{gguf.path}: metadata key {full!r} is missing")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0 and (not whole or value == int(value))):
        kind = "a whole number >= 1" if whole else "a number > 0"
        raise LmarchError(f"{gguf.path}: metadata {full}={value!r} must be {kind}")
    return int(value) if whole else float(value)


def _layer_types(gguf: GGUFFile, n_layer: int) -> tuple[str, ...]:
    """Per layer "sliding" or "full": from ``attention.sliding_window_pattern`` (a period N, the
    N-th layer global, or one bool per layer, true = sliding), else llama.cpp's period 6."""
    key = f"{ARCH}.attention.sliding_window_pattern"
    pattern = gguf.metadata.get(key, GLOBAL_EVERY)
    if isinstance(pattern, list):
        if len(pattern) != n_layer or not all(isinstance(p, bool) for p in pattern):
            raise LmarchError(
                f"{gguf.path}: metadata {key} must be {n_layer} booleans (one per layer)"
            )
        return tuple("sliding" if p else "full" for p in pattern)
    period = _number(gguf, "attention.sliding_window_pattern", GLOBAL_EVERY)
    return tuple("sliding" if (i + 1) % period else "full" for i in range(n_layer))


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    """Linear RoPE scaling of the global layers (Gemma 3 1B+ stretch 8x); other types refused."""
    meta = gguf.metadata
    kind = meta.get(f"{ARCH}.rope.scaling.type", "linear")
    factor = meta.get(f"{ARCH}.rope.scaling.factor", 0.0)
    if kind == "none" or factor in (0, 0.0, 1, 1.0):
        return None
    if kind != "linear":
        raise LmarchError(
            f"{gguf.path}: metadata {ARCH}.rope.scaling.type={kind!r} is not supported (linear)"
        )
    return {"type": "linear", "factor": _number(gguf, "rope.scaling.factor", whole=False)}


def gemma3_config_from_gguf(gguf: GGUFFile, block_size: int | None = None) -> LlamaConfig:
    """Our LlamaConfig (Gemma 3 options on) from a ``gemma3`` GGUF file's metadata, checked against
    the tensors' shapes; ``block_size`` caps the context (default :data:`DEFAULT_BLOCK_SIZE`)."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise LmarchError(f"{gguf.path}: architecture {arch!r} is not {ARCH!r}")
    unknown = sorted(
        k for k in meta if k.startswith(f"{ARCH}.") and k[len(ARCH) + 1 :] not in _KNOWN
    )
    if unknown:
        raise LmarchError(
            f"{gguf.path}: metadata {unknown[0]} is not supported for {ARCH} "
            f"(lmarch reads {', '.join(sorted(_KNOWN))})"
        )
    n_embd = _number(gguf, "embedding_length")
    n_head = _number(gguf, "attention.head_count")
    n_layer = _number(gguf, "block_count")
    head_dim = _number(gguf, "attention.key_length", n_embd // n_head)
    for key in ("attention.value_length", "rope.dimension_count"):
        if _number(gguf, key, head_dim) != head_dim:
            raise LmarchError(
                f"{gguf.path}: metadata {ARCH}.{key}={meta[f'{ARCH}.{key}']} differs from the "
                f"head width {ARCH}.attention.key_length={head_dim}"
            )
    vocab = meta.get(f"{ARCH}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise LmarchError(f"{gguf.path}: no vocabulary size ({ARCH}.vocab_size or tokens)")
    context = min(_number(gguf, "context_length"), MAX_ROTARY_POSITIONS)
    context = min(context, block_size or DEFAULT_BLOCK_SIZE)
    # llama.cpp scales 27B's scores by its n_embd / n_head (168), every other size by head_dim
    scalar = n_embd / n_head if n_layer == 62 else head_dim
    try:
        config = LlamaConfig(
            vocab_size=int(vocab),
            block_size=context,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=_number(gguf, "attention.head_count_kv", n_head),
            n_embd=n_embd,
            intermediate_size=_number(gguf, "feed_forward_length"),
            head_dim=head_dim,
            rms_norm_eps=_number(gguf, "attention.layer_norm_rms_epsilon", 1e-6, whole=False),
            rope_theta=_number(gguf, "rope.freq_base", 1_000_000.0, whole=False),
            rope_scaling=_rope_scaling(gguf),
            rope_local_theta=_number(gguf, "rope.freq_base_swa", 10_000.0, whole=False),
            tie_embeddings="output.weight" not in gguf.tensor_names,
            activation="gelu_tanh",
            qk_norm=True,
            sliding_window=_number(gguf, "attention.sliding_window"),
            layer_types=_layer_types(gguf, n_layer),
            norm_unit_offset=True,
            embedding_scale=True,
            sandwich_norm=True,
            query_pre_attn_scalar=float(scalar),
        )
    except ConfigError as exc:
        raise LmarchError(f"{gguf.path}: the metadata gives an invalid model: {exc}") from exc
    _check_shapes(gguf, config)
    return config


def _check_shapes(gguf: GGUFFile, c: LlamaConfig) -> None:
    """Every tensor the map reads must exist with the shape the metadata implies."""
    d, hd, ff = c.n_embd, c.dim_per_head, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.vocab_size, d),
        "output_norm.weight": (d,),
    }
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    layer = {
        "attn_norm": (d,), "attn_q": (c.n_head * hd, d), "attn_k": (c.kv_heads * hd, d),
        "attn_v": (c.kv_heads * hd, d), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
        "attn_output": (d, c.n_head * hd), "post_attention_norm": (d,), "ffn_norm": (d,),
        "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff), "post_ffw_norm": (d,),
    }  # fmt: skip
    for i in range(c.n_layer):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in layer.items()})
    names = set(gguf.tensor_names)
    for name, expected in shapes.items():
        if name not in names:
            raise LmarchError(f"{gguf.path}: tensor {name!r} is missing")
        found = gguf.tensor_info(name).shape
        if found != expected:
            raise LmarchError(
                f"{gguf.path}: tensor {name!r} has shape {found}, the metadata implies {expected}"
            )
    extra = sorted(names - set(shapes))
    if extra:
        raise LmarchError(f"{gguf.path}: tensor {extra[0]!r} is not part of a {ARCH} model")


def gguf_architecture(path: str | Path) -> str | None:
    """``general.architecture`` of a GGUF file, read from its first key when it is there (as
    llama.cpp writes it) without parsing the vocabulary; else from the whole header."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 12)
        magic, version = head[:4], struct.unpack_from("<I", head, 4)[0]
        if magic == b"GGUF" and version >= 2:
            (key_len,) = struct.unpack_from("<Q", head, 24)
            key = head[32 : 32 + key_len]
            (vtype,) = struct.unpack_from("<I", head, 32 + key_len)
            if key == b"general.architecture" and vtype == _GGUF_STRING:
                (n,) = struct.unpack_from("<Q", head, 36 + key_len)
                value = head[44 + key_len : 44 + key_len + n]
                if len(value) == n:
                    return value.decode("utf-8")
    except (OSError, struct.error, UnicodeDecodeError):
        pass  # the full read below says what is wrong with the file
    gguf = read_gguf(path)
    try:
        arch = gguf.metadata.get("general.architecture")
    finally:
        gguf.close()
    return arch if isinstance(arch, str) else None


def load_gguf_gemma3(
    path: str | Path, block_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Llama, GGUFFile]:
    """A Llama with Gemma 3's options holding the dequantised weights of a llama.cpp ``gemma3``
    GGUF file, and the file itself (its metadata carries the vocabulary).

    ``block_size`` caps the context the rotary tables are built for (default
    :data:`DEFAULT_BLOCK_SIZE`, or the file's context length if smaller)."""
    gguf = read_gguf(path)
    config = gemma3_config_from_gguf(gguf, block_size)
    with empty_weights():
        model = Llama(config)
    tensors = {name: gguf.load(name, dtype=dtype) for name in gguf.tensor_names}
    ours = gguf_gemma3_map(config).to_ours(tensors, config.n_layer, where=str(path))
    load_into_model(model, ours, source=str(path), assign=True)
    model.rotary.reset_tables("cpu")  # buffers are not in the file
    if model.rotary_local is not None:
        model.rotary_local.reset_tables("cpu")
    return model.eval(), gguf


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "gemma3_config_from_gguf",
    "gguf_architecture",
    "gguf_gemma3_map",
    "load_gguf_gemma3",
]
