"""Gemma 2 and Gemma 3 (text) in their Hugging Face layouts, read into a LLaMA with Gemma's
options (Gemma Team 2024, 2025):

    embeddings times sqrt(d)            embedding_scale
    RMSNorm gains stored as 1 + w       norm_unit_offset
    norms before and after attention    sandwich_norm (post_attention_layernorm is the norm on
    and after the MLP                   the attention output; pre_feedforward_layernorm is ours
                                        before the MLP)
    GeGLU (tanh GELU)                   activation "gelu_tanh"
    scores scaled 1/sqrt(s)             query_pre_attn_scalar s
    local and global layers             sliding_window, layer_types (Gemma 2: every other layer
                                        slides; Gemma 3: five of every six)
    Gemma 2 only                        attn_logit_softcap, final_logit_softcap: c tanh(x / c)
    Gemma 3 only                        QK-norm; the local layers' own RoPE base
                                        (rope_local_theta), the scaling on the global ones only

Gemma 3's config.json comes in two spellings: transformers 5 writes ``rope_parameters`` with one
dict per layer type, older files ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``
and ``sliding_window_pattern``; both are read as transformers reads them.
"""

from __future__ import annotations

from typing import Any

from lmarch.errors import LmarchError
from lmarch.models.llama import LlamaConfig
from lmarch.weights.hf import COMMON_INERT, HFConfigFields, refuse
from lmarch.weights.hf_decoders import (
    SHAPE_FIELDS,
    hf_layer_types,
    layer_types_from_hf,
    make_config,
    shape_kwargs,
    shape_to_hf,
)
from lmarch.weights.hf_llama import refuse_variants

_COMMON = (
    *SHAPE_FIELDS, "hidden_activation", "attention_bias", "query_pre_attn_scalar",
    "sliding_window", "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
)  # fmt: skip
_INERT = (
    *COMMON_INERT,
    "attention_dropout",  # training only
    "cache_implementation",  # which cache class generate() builds: same tokens
    "hidden_act",  # Gemma 1's key; Gemma 2/3 read hidden_activation
)
# bidirectional attention (EmbeddingGemma) needs a mask lmarch's decoder does not build
_BIDIRECTIONAL = {"use_bidirectional_attention": (None, False)}

GEMMA2_FIELDS = HFConfigFields("gemma2", implemented=_COMMON, inert=_INERT, refused=_BIDIRECTIONAL)
GEMMA3_FIELDS = HFConfigFields(
    "gemma3_text",
    implemented=(
        *_COMMON,
        "rope_local_base_freq",
        "sliding_window_pattern",
        "_sliding_window_pattern",
    ),
    inert=_INERT,
    refused=_BIDIRECTIONAL,
)

# transformers' defaults for the keys a config.json may leave out
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)  # fmt: skip
_GEMMA3_DEFAULTS = {**_GEMMA2_DEFAULTS, "vocab_size": 262208, "max_position_embeddings": 131072}
_NAMES = {
    "sliding_window": "sliding_window",
    "layer_types": "layer_types",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping",
    "rope_local_theta": "rope_local_base_freq",
}


def _gemma_kwargs(
    hf: dict[str, Any], where: str, family: str, defaults: dict[str, Any]
) -> dict[str, Any]:
    kwargs = shape_kwargs(hf, where, family, defaults, act_key="hidden_activation")
    kwargs.update(
        embedding_scale=True,
        norm_unit_offset=True,
        sandwich_norm=True,
        attention_bias=hf.get("attention_bias", False),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
    )
    return kwargs


def gemma2_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``Gemma2Config`` dict (fields refused by name)."""
    GEMMA2_FIELDS.check(hf, where)
    kwargs = _gemma_kwargs(hf, where, "gemma2", _GEMMA2_DEFAULTS)
    kwargs["sliding_window"], kwargs["layer_types"] = layer_types_from_hf(
        hf, hf.get("sliding_window", 4096), lambda i: i % 2 == 0, "gemma2", where
    )
    kwargs["attn_logit_softcap"] = hf.get("attn_logit_softcapping", 50.0)
    kwargs["final_logit_softcap"] = hf.get("final_logit_softcapping", 30.0)
    return make_config(kwargs, where, "gemma2", _NAMES)


def _gemma3_rope(hf: dict[str, Any], where: str) -> tuple[dict[str, Any], float]:
    """(the global layers' rope dict, the local layers' base), as transformers 5 builds them
    from either spelling of the file."""
    params = hf.get("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict) or set(params) - {"sliding_attention", "full_attention"}:
        raise refuse(
            where, "gemma3_text", "rope_parameters", params,
            "a dict with 'sliding_attention' and 'full_attention' entries",
        )  # fmt: skip
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    kind = local.get("rope_type", local.get("type", "default"))
    if kind != "default":
        raise refuse(
            where, "gemma3_text", "rope_parameters.sliding_attention.rope_type", kind, "'default'"
        )
    return full, local["rope_theta"]


def gemma3_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``Gemma3TextConfig`` dict (fields refused by name)."""
    GEMMA3_FIELDS.check(hf, where)
    full, local_theta = _gemma3_rope(hf, where)
    # the global layers' RoPE (with any scaling) is the model's; the local layers' is plain
    flat = {
        k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")
    }
    kwargs = _gemma_kwargs(
        {**flat, "rope_parameters": full}, where, "gemma3_text", _GEMMA3_DEFAULTS
    )
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise refuse(where, "gemma3_text", "sliding_window_pattern", pattern, "an integer >= 1")
    kwargs["sliding_window"], kwargs["layer_types"] = layer_types_from_hf(
        hf, hf.get("sliding_window", 4096), lambda i: (i + 1) % pattern != 0, "gemma3_text", where
    )
    kwargs.update(
        qk_norm=True,
        rope_local_theta=local_theta,
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )
    return make_config(kwargs, where, "gemma3_text", _NAMES)


def gemma_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``Gemma3TextConfig`` dict when ``c`` has QK-norm, else a ``Gemma2Config``
    one; Gemma's three options (scaled embeddings, 1 + w gains, sandwich norms) must all be on."""
    family = "gemma3_text" if c.qk_norm else "gemma2"
    allowed = (
        "sliding_window", "layer_types", "norm_unit_offset", "embedding_scale", "sandwich_norm",
        "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
        *(("qk_norm", "rope_local_theta") if c.qk_norm else ()),
    )  # fmt: skip
    refuse_variants(c, family, allowed)
    for name in ("norm_unit_offset", "embedding_scale", "sandwich_norm"):
        if not getattr(c, name):
            raise LmarchError(f"the Hugging Face {family} layout needs {name}=True")
    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    if c.mlp_bias or c.partial_rotary_factor != 1.0 or out_bias != c.attention_bias:
        raise LmarchError(
            f"the Hugging Face {family} layout has no MLP biases, partial RoPE or output bias "
            "apart from the q/k/v ones"
        )
    arch = "Gemma3ForCausalLM" if c.qk_norm else "Gemma2ForCausalLM"
    out = shape_to_hf(c, family, arch)
    out["hidden_activation"] = out.pop("hidden_act")
    out.update(
        attention_bias=c.attention_bias,
        query_pre_attn_scalar=c.query_pre_attn_scalar or c.dim_per_head,
        sliding_window=c.sliding_window,
        layer_types=hf_layer_types(c),
        attn_logit_softcapping=c.attn_logit_softcap,
        final_logit_softcapping=c.final_logit_softcap,
    )
    if c.qk_norm:
        full = {"rope_type": "default", **(out.pop("rope_scaling") or {})}
        full["rope_theta"] = out.pop("rope_theta")
        if c.rope_local_theta is None and c.rope_scaling is not None:
            raise LmarchError(
                "the Hugging Face gemma3_text layout scales the global layers' RoPE only: "
                "set rope_local_theta for the sliding layers"
            )
        local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
        out["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    return out


__all__ = [
    "GEMMA2_FIELDS",
    "GEMMA3_FIELDS",
    "gemma2_config_from_hf",
    "gemma3_config_from_hf",
    "gemma_config_to_hf",
]
