"""LLaMA in the Hugging Face layout (``LlamaForCausalLM``): names, config and folders.

Every field of ``LlamaConfig`` either changes our model as it changes transformers' or is
refused by name (:data:`LLAMA_FIELDS`). Their q/k/v projections are three matrices and gate/up
two; ours are fused (``attn.qkv``, ``ffn.gate_up``), so their rows are concatenated on the way
in and split on the way out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.weights.hf import (
    COMMON_INERT,
    HFConfigFields,
    build_config,
    build_from_weights,
    read_hf_config,
    read_hf_weights,
    refuse,
    write_hf_folder,
)
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import unique_state_dict

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
_ATTENTION_BIASES = [
    Rule("blocks.{i}.attn.qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv")),
    Rule("blocks.{i}.attn.out.bias", _L + "self_attn.o_proj.bias"),
]
_MLP_BIASES = [
    Rule("blocks.{i}.ffn.gate_up.bias", (_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias")),
    Rule("blocks.{i}.ffn.down.bias", _L + "mlp.down_proj.bias"),
]


def llama_map(config: LlamaConfig) -> WeightMap:
    """The name map for ``config``: with the output head unless it is tied to the embeddings,
    and the projections' biases where ``attention_bias`` / ``mlp_bias`` ask for them."""
    rules = list(LLAMA_MAP.rules)
    rules += _ATTENTION_BIASES if config.attention_bias else []
    rules += _MLP_BIASES if config.mlp_bias else []
    if config.tie_embeddings:
        return WeightMap(rules, ignore=[r"^lm_head\.weight$", r"rotary_emb\.inv_freq$"])
    return WeightMap(rules + [_LM_HEAD], ignore=[r"rotary_emb\.inv_freq$"])


def split_sizes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Row counts of the parts of each fused tensor, for exporting."""
    hd = config.dim_per_head
    qkv = (config.n_head * hd, config.kv_heads * hd, config.kv_heads * hd)
    gate_up = (config.intermediate_size, config.intermediate_size)
    return {
        "blocks.{i}.attn.qkv.weight": qkv,
        "blocks.{i}.attn.qkv.bias": qkv,
        "blocks.{i}.ffn.gate_up.weight": gate_up,
        "blocks.{i}.ffn.gate_up.bias": gate_up,
    }


# transformers' activation names -> ours, for the gated unit
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "tanh": "tanh",
}
_ACTIVATIONS_TO_HF = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "tanh": "tanh",
}

# RoPE types of transformers' ROPE_INIT_FUNCTIONS that lmarch implements, and the keys each reads
_ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": (
        "factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
        "truncate",
    ),
}  # fmt: skip

LLAMA_FIELDS = HFConfigFields(
    "llama",
    implemented=(
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
        "mlp_bias", "rope_parameters", "rope_scaling", "rope_theta",
        "original_max_position_embeddings",  # llama3 / yarn: overrides the rope dict's
    ),
    inert=(
        *COMMON_INERT,
        "attention_dropout",  # training only
        "pretraining_tp",  # transformers 4 split the matmuls in this many slices: same values
    ),
    refused={"partial_rotary_factor": (1.0, 1, None)},  # transformers' LLaMA cannot run it
)  # fmt: skip

# our LlamaConfig field -> the config.json key it comes from
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "block_size": "max_position_embeddings",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "n_embd": "hidden_size",
    "intermediate_size": "intermediate_size",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "tie_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
    "mlp_bias": "mlp_bias",
}


def _rope_from_hf(
    hf: dict[str, Any], max_len: int, where: str
) -> tuple[float, dict[str, Any] | None, int]:
    """(rope theta, our scaling dict, context length) as transformers reads them: ``rope_scaling``
    before ``rope_parameters``; the dict's ``rope_theta`` before the top-level one."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise refuse(where, "llama", "rope_scaling", rope, "a dict (or null)")
    theta = rope.get("rope_theta")
    theta = hf.get("rope_theta", 10000.0) if theta is None else theta
    partial = rope.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise refuse(where, "llama", "rope_parameters.partial_rotary_factor", partial, "1.0")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None, max_len
    if kind not in _ROPE_KEYS:
        supported = f"rope_type one of {['default', *_ROPE_KEYS]}"
        raise refuse(where, "llama", "rope_scaling.rope_type", kind, supported)
    scaling: dict[str, Any] = {"type": kind}
    scaling.update((k, rope[k]) for k in _ROPE_KEYS[kind] if rope.get(k) is not None)
    if kind == "dynamic":
        # transformers grows the base past max_position_embeddings; we let the context run to
        # factor times that length (the stretch the factor is meant for)
        scaling["original_max_position_embeddings"] = max_len
        factor = scaling.get("factor")
        if isinstance(factor, (int, float)) and factor > 1:
            max_len = int(max_len * factor)
    elif kind in ("llama3", "yarn"):
        old = hf.get("original_max_position_embeddings")
        old = rope.get("original_max_position_embeddings", max_len) if old is None else old
        scaling["original_max_position_embeddings"] = old
        if kind == "yarn" and rope.get("factor", 0) is None and isinstance(old, int) and old > 0:
            scaling["factor"] = max_len / old  # transformers' default: the length ratio
    return theta, scaling, max_len


def llama_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``LlamaConfig`` dict; a field lmarch does not implement
    (at a value other than transformers' default) is refused by name. Missing fields take
    transformers' defaults, as ``LlamaConfig`` does."""
    LLAMA_FIELDS.check(hf, where)
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise refuse(where, "llama", "hidden_act", act, f"one of {sorted(_ACTIVATIONS)}")
    max_len = hf.get("max_position_embeddings", 2048)
    theta, scaling, block_size = _rope_from_hf(hf, max_len, where)
    return build_config(
        lambda: LlamaConfig(
            vocab_size=hf.get("vocab_size", 32000),
            block_size=block_size,
            n_layer=hf.get("num_hidden_layers", 32),
            n_head=hf.get("num_attention_heads", 32),
            n_kv_head=hf.get("num_key_value_heads"),
            n_embd=hf.get("hidden_size", 4096),
            intermediate_size=hf.get("intermediate_size", 11008),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            activation=_ACTIVATIONS[act],
        ),
        _HF_NAMES,
        where,
        "llama",
    )


def _rope_to_hf(c: LlamaConfig) -> tuple[float, dict[str, Any] | None, int]:
    """(rope_theta, rope_scaling, max_position_embeddings) for transformers."""
    scaling = dict(c.rope_scaling) if c.rope_scaling else None
    kind = (scaling or {}).get("type", (scaling or {}).get("rope_type", "default"))
    if scaling is None or kind == "default":
        return c.rope_theta, None, c.block_size
    if kind == "factors":
        raise LmarchError(
            "RoPE with per-frequency factors (a GGUF's rope_freqs tensor) has no Hugging Face "
            "LLaMA config field"
        )
    if kind == "ntk":  # static NTK is plain RoPE with a larger base
        d = c.rotary_dim
        return c.rope_theta * scaling["factor"] ** (d / (d - 2)), None, c.block_size
    out = {
        "rope_type": kind,
        **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")},
    }
    if kind == "dynamic":  # transformers' dynamic type starts growing at max_position_embeddings
        old = out.pop("original_max_position_embeddings", None) or c.block_size
        return c.rope_theta, out, old
    return c.rope_theta, out, c.block_size


def llama_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict for our config."""
    if c.partial_rotary_factor != 1.0:
        raise LmarchError("the Hugging Face LLaMA layout has no partial rotary embeddings")
    if c.activation not in _ACTIVATIONS_TO_HF:
        raise LmarchError(f"the Hugging Face LLaMA layout has no activation {c.activation!r}")
    theta, rope, max_len = _rope_to_hf(c)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": max_len,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "head_dim": c.dim_per_head,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": rope,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "hidden_act": _ACTIVATIONS_TO_HF[c.activation],
    }


def load_hf_llama(folder: str | Path) -> Llama:
    """A Llama holding the weights of a Hugging Face LLaMA folder (sharded or not)."""
    config = llama_config_from_hf(read_hf_config(folder), where=str(Path(folder) / "config.json"))
    tensors = llama_map(config).to_ours(read_hf_weights(folder), config.n_layer, where=str(folder))
    return build_from_weights(lambda: Llama(config), tensors, str(folder))


def save_hf_llama(model: Llama, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face LLaMA folder that ``LlamaForCausalLM`` loads."""
    c = model.config
    tensors = llama_map(c).to_theirs(
        unique_state_dict(model), c.n_layer, split_sizes=split_sizes(c)
    )
    write_hf_folder(folder, llama_config_to_hf(c), tensors)
