"""LLaMA-architecture GGUF files (llama.cpp's layout) -> lmarch's Llama.

Two conventions differ from the Hugging Face layout:
- tensor names (``blk.{i}.attn_q.weight`` ...) and separate q/k/v, gate/up, fused here;
- llama.cpp's converter permutes the rows of W_Q and W_K inside each head so that its RoPE
  rotates adjacent pairs (x_{2j}, x_{2j+1}); we rotate (x_j, x_{j+d/2}) as the HF layout does, so
  the permutation is undone on load:  rows (h, j, 2) -> (h, 2, j) for each head h.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.nn.init import empty_weights
from lmarch.weights.gguf import GGUFFile, read_gguf
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import load_into_model


def unpermute_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's per-head row interleaving of a Q or K projection [n_heads*hd, in]."""
    out_dim = weight.shape[0]
    hd = out_dim // n_heads
    return (
        weight.reshape(n_heads, hd // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(out_dim, *weight.shape[1:])
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


def llama_config_from_gguf(gguf: GGUFFile) -> LlamaConfig:
    """Our LlamaConfig from a GGUF file's ``llama.*`` metadata."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LmarchError(f"{gguf.path}: architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise LmarchError(f"{gguf.path}: metadata key 'llama.{key}' is missing")
        return value

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", n_embd // n_head))
    rotary = int(meta.get("llama.rope.dimension_count", head_dim))
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    kind = meta.get("llama.rope.scaling.type")
    if kind in ("linear", "yarn") and meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        if kind != "linear":
            raise LmarchError(f"{gguf.path}: RoPE scaling {kind!r} is not supported")
        scaling = {"type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    return LlamaConfig(
        vocab_size=int(vocab),
        block_size=int(get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(meta.get("llama.attention.head_count_kv", n_head)),
        n_embd=n_embd,
        intermediate_size=int(get("feed_forward_length")),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        partial_rotary_factor=rotary / head_dim,
        tie_embeddings="output.weight" not in gguf.tensor_names,
    )


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
