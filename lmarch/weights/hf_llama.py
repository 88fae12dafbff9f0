"""LLaMA in the Hugging Face layout (``LlamaForCausalLM``): names, config and folders.

Every field of ``LlamaConfig`` either changes our model as it changes transformers' or is
refused by name (:data:`LLAMA_FIELDS`). Their q/k/v projections are three matrices and gate/up
two; ours are fused (``attn.qkv``, ``ffn.gate_up``), so their rows are concatenated on the way
in and split on the way out.

The name map (:func:`decoder_map`) and the RoPE reading (:func:`rope_from_hf`) serve the
LLaMA variants too (Qwen2/3, Mistral, Phi-3, Gemma 2/3: :mod:`lmarch.weights.hf_decoders`).
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
_QKV_BIAS = Rule("blocks.{i}.attn.qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"))
_OUT_BIAS = Rule("blocks.{i}.attn.out.bias", _L + "self_attn.o_proj.bias")
_MLP_BIASES = [
    Rule("blocks.{i}.ffn.gate_up.bias", (_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias")),
    Rule("blocks.{i}.ffn.down.bias", _L + "mlp.down_proj.bias"),
]
_QK_NORM = [
    Rule("blocks.{i}.attn.q_norm.weight", _L + "self_attn.q_norm.weight"),
    Rule("blocks.{i}.attn.k_norm.weight", _L + "self_attn.k_norm.weight"),
]
# Gemma 2/3 name the four norms of a sandwich layer; their post_attention_layernorm is the
# norm on the attention output, where LLaMA's is the norm before the MLP
_SANDWICH = {
    "blocks.{i}.post_norm_attn.weight": _L + "post_attention_layernorm.weight",
    "blocks.{i}.norm_ffn.weight": _L + "pre_feedforward_layernorm.weight",
    "blocks.{i}.post_norm_ffn.weight": _L + "post_feedforward_layernorm.weight",
}
# Phi-3 keeps q/k/v and gate/up fused, as we do
_FUSED = {
    "blocks.{i}.attn.qkv.weight": _L + "self_attn.qkv_proj.weight",
    "blocks.{i}.ffn.gate_up.weight": _L + "mlp.gate_up_proj.weight",
}


def decoder_map(config: LlamaConfig, fused: bool = False) -> WeightMap:
    """The name map for ``config`` in the LLaMA layout: with the output head unless it is tied
    to the embeddings, the projections' biases where ``attention_bias`` /
    ``attention_out_bias`` / ``mlp_bias`` ask for them, QK-norm gains (Qwen3, Gemma 3) and
    Gemma's sandwich norms where the config has them; ``fused``: Phi-3's single ``qkv_proj``
    and ``gate_up_proj`` matrices."""
    rules = [r for r in LLAMA_MAP.rules if not (config.sandwich_norm and r.ours in _SANDWICH)]
    if config.sandwich_norm:
        rules += [Rule(ours, theirs) for ours, theirs in _SANDWICH.items()]
    if fused:
        rules = [Rule(r.ours, _FUSED[r.ours]) if r.ours in _FUSED else r for r in rules]
    out_bias = (
        config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
    )
    rules += [_QKV_BIAS] if config.attention_bias else []
    rules += [_OUT_BIAS] if out_bias else []
    rules += _MLP_BIASES if config.mlp_bias else []
    rules += _QK_NORM if config.qk_norm else []
    if config.tie_embeddings:
        return WeightMap(rules, ignore=[r"^lm_head\.weight$", r"rotary_emb\.inv_freq$"])
    return WeightMap(rules + [_LM_HEAD], ignore=[r"rotary_emb\.inv_freq$"])


def llama_map(config: LlamaConfig) -> WeightMap:
    """The name map of a LLaMA folder for ``config`` (:func:`decoder_map` in LLaMA's names)."""
    return decoder_map(config)


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
GATED_ACTIVATIONS = {
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
GATED_ACTIVATIONS_TO_HF = {
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
HF_NAMES = {
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


def rope_from_hf(
    hf: dict[str, Any],
    max_len: int,
    where: str,
    family: str = "llama",
    partial_ok: bool = False,
    default_theta: float = 10000.0,
) -> tuple[float, dict[str, Any] | None, int]:
    """(rope theta, our scaling dict, context length) as transformers reads them: ``rope_scaling``
    before ``rope_parameters``; the dict's ``rope_theta`` before the top-level one. A partial
    rotary factor is refused unless ``partial_ok`` (the caller reads it: Phi-3)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise refuse(where, family, "rope_scaling", rope, "a dict (or null)")
    theta = rope.get("rope_theta")
    theta = hf.get("rope_theta", default_theta) if theta is None else theta
    partial = rope.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0) and not partial_ok:
        raise refuse(where, family, "rope_parameters.partial_rotary_factor", partial, "1.0")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None, max_len
    if kind not in _ROPE_KEYS:
        supported = f"rope_type one of {['default', *_ROPE_KEYS]}"
        raise refuse(where, family, "rope_scaling.rope_type", kind, supported)
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
    if act not in GATED_ACTIVATIONS:
        raise refuse(where, "llama", "hidden_act", act, f"one of {sorted(GATED_ACTIVATIONS)}")
    max_len = hf.get("max_position_embeddings", 2048)
    theta, scaling, block_size = rope_from_hf(hf, max_len, where)
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
            activation=GATED_ACTIVATIONS[act],
        ),
        HF_NAMES,
        where,
        "llama",
    )


def rope_to_hf(c: LlamaConfig) -> tuple[float, dict[str, Any] | None, int]:
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


def refuse_variants(c: LlamaConfig, family: str, allowed: tuple[str, ...] = ()) -> None:
    """Raise :class:`LmarchError` naming the first LLaMA-variant option of ``c`` (set away from
    LLaMA's default) that the Hugging Face ``family`` layout cannot express; ``allowed`` are
    those it can."""
    plain = LlamaConfig(
        vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd
    )
    for name in VARIANT_FIELDS:
        if name not in allowed and getattr(c, name) != getattr(plain, name):
            raise LmarchError(
                f"the Hugging Face {family} layout has no {name}={getattr(c, name)!r}",
                hint="export it as the family it was read from (lmarch.weights.hf_decoders)",
            )


# LlamaConfig's options of later decoders, which LLaMA's own layout does not have
VARIANT_FIELDS = (
    "attention_out_bias", "qk_norm", "sliding_window", "layer_types", "rope_local_theta",
    "norm_unit_offset", "embedding_scale", "sandwich_norm", "query_pre_attn_scalar",
    "attn_logit_softcap", "final_logit_softcap",
)  # fmt: skip


def shape_to_hf(c: LlamaConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json keys every LLaMA-layout family (LLaMA, Qwen, Mistral, Phi-3, Gemma)
    writes alike."""
    if c.activation not in GATED_ACTIVATIONS_TO_HF:
        raise LmarchError(
            f"the Hugging Face {model_type} layout has no activation {c.activation!r}"
        )
    theta, rope, max_len = rope_to_hf(c)
    out = {
        "architectures": [architecture],
        "model_type": model_type,
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
        "hidden_act": GATED_ACTIVATIONS_TO_HF[c.activation],
        # the model has no token ids; a family default (Phi-3's 32000) may lie past the vocab
        "pad_token_id": None,
    }
    if c.head_dim is None and model_type in ("qwen2", "mistral", "phi3"):
        del out["head_dim"]  # their default is n_embd / n_head too (Qwen3's and Gemma's is not)
    return out


def llama_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict for our config."""
    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    refuse_variants(c, "LLaMA", ("attention_out_bias",) if out_bias == c.attention_bias else ())
    if c.partial_rotary_factor != 1.0:
        raise LmarchError("the Hugging Face LLaMA layout has no partial rotary embeddings")
    out = shape_to_hf(c, "llama", "LlamaForCausalLM")
    return {**out, "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias}


def load_decoder_weights(folder: str | Path, config: LlamaConfig, fused: bool = False) -> Llama:
    """A Llama of ``config`` holding the folder's weights in the LLaMA layout (``fused``:
    Phi-3's)."""
    tensors = decoder_map(config, fused).to_ours(
        read_hf_weights(folder), config.n_layer, where=str(folder)
    )
    return build_from_weights(lambda: Llama(config), tensors, str(folder))


def save_decoder(
    model: Llama, folder: str | Path, hf_config: dict[str, Any], fused: bool = False
) -> None:
    """Write ``model``'s weights in the LLaMA layout (``fused``: Phi-3's) with ``hf_config``."""
    c = model.config
    sizes = {} if fused else split_sizes(c)
    tensors = decoder_map(c, fused).to_theirs(
        unique_state_dict(model), c.n_layer, split_sizes=sizes
    )
    write_hf_folder(folder, hf_config, tensors)


def load_hf_llama(folder: str | Path) -> Llama:
    """A Llama holding the weights of a Hugging Face LLaMA folder (sharded or not)."""
    config = llama_config_from_hf(read_hf_config(folder), where=str(Path(folder) / "config.json"))
    return load_decoder_weights(folder, config)


def save_hf_llama(model: Llama, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face LLaMA folder that ``LlamaForCausalLM`` loads."""
    save_decoder(model, folder, llama_config_to_hf(model.config))
