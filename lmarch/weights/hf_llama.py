"""LLaMA in the Hugging Face layout (``LlamaForCausalLM``): names, config and folders.

Their q/k/v projections are three matrices and gate/up two; ours are fused (``attn.qkv``,
``ffn.gate_up``), so their rows are concatenated on the way in and split on the way out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.weights.hf import read_hf_config, read_hf_weights, write_hf_folder
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import load_into_model, unique_state_dict

_L = "model.layers.{i}."

LLAMA_MAP = WeightMap(
    [
        Rule("tok_emb.weight", "model.embed_tokens.weight"),
        Rule("blocks.{i}.norm_attn.weight", _L + "input_layernorm.weight"),
        Rule(
            "blocks.{i}.attn.qkv.weight",
            tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
        ),
        Rule("blocks.{i}.attn.out.weight", _L + "self_attn.o_proj.weight"),
        Rule("blocks.{i}.norm_ffn.weight", _L + "post_attention_layernorm.weight"),
        Rule(
            "blocks.{i}.ffn.gate_up.weight",
            (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        ),
        Rule("blocks.{i}.ffn.down.weight", _L + "mlp.down_proj.weight"),
        Rule("norm_f.weight", "model.norm.weight"),
    ],
    ignore=[r"^lm_head\.weight$", r"rotary_emb\.inv_freq$"],
)
_LM_HEAD = Rule("lm_head.weight", "lm_head.weight")


def llama_map(config: LlamaConfig) -> WeightMap:
    """The name map for ``config``: with the output head unless it is tied to the embeddings."""
    if config.tie_embeddings:
        return LLAMA_MAP
    return WeightMap(LLAMA_MAP.rules + [_LM_HEAD], ignore=[r"rotary_emb\.inv_freq$"])


def split_sizes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Row counts of the parts of each fused tensor, for exporting."""
    hd = config.dim_per_head
    return {
        "blocks.{i}.attn.qkv.weight": (
            config.n_head * hd,
            config.kv_heads * hd,
            config.kv_heads * hd,
        ),
        "blocks.{i}.ffn.gate_up.weight": (config.intermediate_size, config.intermediate_size),
    }


def llama_config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """Our LlamaConfig from a transformers ``LlamaConfig`` dict."""
    if hf.get("hidden_act", "silu") != "silu":
        raise LmarchError(f"unsupported LLaMA activation {hf['hidden_act']!r}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    theta = hf.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
    if rope is not None and rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads"),
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=dict(rope) if rope else None,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
    )


def llama_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict for our config."""
    if c.partial_rotary_factor != 1.0:
        raise LmarchError("the Hugging Face LLaMA layout has no partial rotary embeddings")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.block_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "head_dim": c.dim_per_head,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "hidden_act": "silu",
    }


def load_hf_llama(folder: str | Path) -> Llama:
    """A Llama holding the weights of a Hugging Face LLaMA folder (sharded or not)."""
    config = llama_config_from_hf(read_hf_config(folder))
    model = Llama(config)
    tensors = llama_map(config).to_ours(read_hf_weights(folder), config.n_layer, where=str(folder))
    load_into_model(model, tensors, source=str(folder))
    return model


def save_hf_llama(model: Llama, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face LLaMA folder that ``LlamaForCausalLM`` loads."""
    c = model.config
    tensors = llama_map(c).to_theirs(
        unique_state_dict(model), c.n_layer, split_sizes=split_sizes(c)
    )
    write_hf_folder(folder, llama_config_to_hf(c), tensors)
