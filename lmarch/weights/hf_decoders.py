"""Decoders that are LLaMA with options, in their Hugging Face layouts: Qwen2, Qwen3, Mistral,
Phi-3 (here) and Gemma 2 / Gemma 3 (:mod:`lmarch.weights.hf_gemma`).

Each family is read into a :class:`~lmarch.models.llama.LlamaConfig` whose variant fields say
how it differs from LLaMA:

    Qwen2     biases on q/k/v but not on the output projection; sliding window on the layers
              from ``max_window_layers`` on, when ``use_sliding_window``
    Qwen3     QK-norm (RMSNorm over each query and key head before RoPE); biases all or none
    Mistral   sliding-window attention on every layer
    Phi-3     LLaMA with q/k/v and gate/up stored fused (as ours are), partial RoPE, optional
              sliding window on every layer

As for LLaMA, every config.json field changes our model as it changes transformers' or is
refused by name (:class:`~lmarch.weights.hf.HFConfigFields` per family). Writing goes the other
way: :func:`save_hf_decoder` picks the family whose layout expresses the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.weights.hf import (
    COMMON_INERT,
    HFConfigFields,
    build_config,
    read_hf_config,
    refuse,
)
from lmarch.weights.hf_llama import (
    GATED_ACTIVATIONS,
    HF_NAMES,
    LLAMA_FIELDS,
    llama_config_from_hf,
    llama_config_to_hf,
    load_decoder_weights,
    refuse_variants,
    rope_from_hf,
    save_decoder,
    shape_to_hf,
)

# the config.json keys of a LLaMA-shaped model that every family here reads the same way
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
)  # fmt: skip
_TRAINING_ONLY = ("attention_dropout",)

QWEN2_FIELDS = HFConfigFields(
    "qwen2",
    implemented=(
        *SHAPE_FIELDS, "hidden_act", "use_sliding_window", "sliding_window",
        "max_window_layers", "layer_types",
    ),
    inert=(*COMMON_INERT, *_TRAINING_ONLY),
)  # fmt: skip
QWEN3_FIELDS = HFConfigFields(
    "qwen3",
    implemented=(*QWEN2_FIELDS.implemented, "attention_bias"),
    inert=QWEN2_FIELDS.inert,
)
MISTRAL_FIELDS = HFConfigFields(
    "mistral",
    implemented=(*SHAPE_FIELDS, "hidden_act", "sliding_window"),
    inert=(*COMMON_INERT, *_TRAINING_ONLY),
)
PHI3_FIELDS = HFConfigFields(
    "phi3",
    implemented=(*SHAPE_FIELDS, "hidden_act", "sliding_window", "partial_rotary_factor"),
    inert=(
        *COMMON_INERT, *_TRAINING_ONLY,
        "resid_pdrop", "embd_pdrop",  # dropout: training only
        "original_max_position_embeddings",  # read only by LongRoPE, which is refused
    ),
)  # fmt: skip

# transformers' names of the attention kinds -> ours
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def layer_types_from_hf(
    hf: dict[str, Any], window: int | None, default: Callable[[int], bool], family: str, where: str
) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding window, our layer_types) from ``layer_types`` or, when the file has none, from
    ``default(i)`` (whether layer i slides). No window: every layer attends fully; every layer
    sliding: None (the config's default)."""
    n = hf.get("num_hidden_layers", 32) if isinstance(hf.get("num_hidden_layers"), int) else 0
    given = hf.get("layer_types")
    if given is None:
        kinds = ["sliding" if default(i) else "full" for i in range(n)]
    else:
        if not isinstance(given, list) or any(k not in _LAYER_TYPES for k in given):
            raise refuse(where, family, "layer_types", given, f"a list of {list(_LAYER_TYPES)}")
        kinds = [_LAYER_TYPES[k] for k in given]
    if window is None or "sliding" not in kinds:
        return None, None
    return window, None if all(k == "sliding" for k in kinds) else tuple(kinds)


def shape_kwargs(
    hf: dict[str, Any],
    where: str,
    family: str,
    defaults: dict[str, Any],
    act_key: str = "hidden_act",
    partial_ok: bool = False,
) -> dict[str, Any]:
    """The LlamaConfig arguments every family here reads alike: sizes, norm epsilon, tied head,
    RoPE and the gated unit's activation; a missing key takes ``defaults[key]``
    (transformers' default for the family)."""

    def get(key: str) -> Any:
        return hf.get(key, defaults.get(key))

    act = get(act_key)
    if act not in GATED_ACTIVATIONS:
        raise refuse(where, family, act_key, act, f"one of {sorted(GATED_ACTIVATIONS)}")
    theta, scaling, block_size = rope_from_hf(
        hf, get("max_position_embeddings"), where, family, partial_ok=partial_ok
    )
    return dict(
        vocab_size=get("vocab_size"),
        block_size=block_size,
        n_layer=get("num_hidden_layers"),
        n_head=get("num_attention_heads"),
        n_kv_head=get("num_key_value_heads"),
        n_embd=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        head_dim=get("head_dim"),
        rms_norm_eps=get("rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=get("tie_word_embeddings"),
        activation=GATED_ACTIVATIONS[act],
    )


def make_config(
    kwargs: dict[str, Any], where: str, family: str, hf_names: dict[str, str]
) -> LlamaConfig:
    """``LlamaConfig(**kwargs)``, a range error named by the config.json key it came from."""
    return build_config(lambda: LlamaConfig(**kwargs), {**HF_NAMES, **hf_names}, where, family)


# transformers' defaults for the keys a config.json may leave out
_QWEN_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
_MISTRAL_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
_PHI3_DEFAULTS = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)  # fmt: skip
_WINDOW_NAMES = {"sliding_window": "sliding_window", "layer_types": "layer_types"}


def _qwen_config_from_hf(hf: dict[str, Any], where: str, family: str) -> LlamaConfig:
    fields = QWEN3_FIELDS if family == "qwen3" else QWEN2_FIELDS
    fields.check(hf, where)
    defaults = {**_QWEN_DEFAULTS, "head_dim": 128} if family == "qwen3" else _QWEN_DEFAULTS
    kwargs = shape_kwargs(hf, where, family, defaults)
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    first = hf.get("max_window_layers", 28)
    kwargs["sliding_window"], kwargs["layer_types"] = layer_types_from_hf(
        hf, window, lambda i: i >= first, family, where
    )
    if family == "qwen3":  # QK-norm; one switch for the biases of all four projections
        kwargs.update(qk_norm=True, attention_bias=hf.get("attention_bias", False))
    else:  # biases on q, k and v, none on the output
        kwargs.update(attention_bias=True, attention_out_bias=False)
    return make_config(kwargs, where, family, _WINDOW_NAMES)


def qwen2_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``Qwen2Config`` dict (fields refused by name)."""
    return _qwen_config_from_hf(hf, where, "qwen2")


def qwen3_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``Qwen3Config`` dict (fields refused by name)."""
    return _qwen_config_from_hf(hf, where, "qwen3")


def mistral_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``MistralConfig`` dict: every layer slides over
    ``sliding_window`` keys (none when it is null)."""
    MISTRAL_FIELDS.check(hf, where)
    kwargs = shape_kwargs(hf, where, "mistral", _MISTRAL_DEFAULTS)
    kwargs["sliding_window"] = hf.get("sliding_window", 4096)
    return make_config(kwargs, where, "mistral", _WINDOW_NAMES)


def phi3_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a transformers ``Phi3Config`` dict: plain RoPE (LongRoPE is
    refused), partial when ``partial_rotary_factor`` < 1, sliding window on every layer when
    ``sliding_window`` is set."""
    PHI3_FIELDS.check(hf, where)
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if kind != "default":  # transformers reads Phi-3's "su" and "yarn" as LongRoPE
        raise refuse(where, "phi3", "rope_scaling.rope_type", kind, "rope_type 'default'")
    kwargs = shape_kwargs(hf, where, "phi3", _PHI3_DEFAULTS, partial_ok=True)
    partial = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    kwargs["partial_rotary_factor"] = (
        hf.get("partial_rotary_factor", 1.0) if partial is None else partial
    )
    kwargs["sliding_window"] = hf.get("sliding_window")
    return make_config(kwargs, where, "phi3", _WINDOW_NAMES)


# ---- writing ---------------------------------------------------------------------------------


def hf_layer_types(c: LlamaConfig) -> list[str]:
    """transformers' ``layer_types`` for our config."""
    return ["sliding_attention" if s else "full_attention" for s in c.sliding_layers]


def _need(c: LlamaConfig, family: str, **wanted: Any) -> None:
    for name, value in wanted.items():
        if getattr(c, name) != value:
            raise LmarchError(
                f"the Hugging Face {family} layout needs {name}={value!r}, got {getattr(c, name)!r}"
            )


def _no_partial(c: LlamaConfig, family: str) -> None:
    if c.partial_rotary_factor != 1.0:
        raise LmarchError(f"the Hugging Face {family} layout has no partial rotary embeddings")


def qwen_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``Qwen3Config`` dict when ``c`` has QK-norm, else a ``Qwen2Config`` one
    (biases on q/k/v only)."""
    family = "qwen3" if c.qk_norm else "qwen2"
    refuse_variants(c, family, ("attention_out_bias", "qk_norm", "sliding_window", "layer_types"))
    _no_partial(c, family)
    _need(c, family, mlp_bias=False)
    if family == "qwen2":
        _need(c, family, attention_bias=True, attention_out_bias=False)
    elif c.attention_out_bias not in (None, c.attention_bias):
        raise LmarchError("the Hugging Face qwen3 layout has one bias switch for q/k/v and output")
    arch = "Qwen3ForCausalLM" if c.qk_norm else "Qwen2ForCausalLM"
    out = shape_to_hf(c, family, arch)
    out.update(
        use_sliding_window=c.sliding_window is not None,
        sliding_window=c.sliding_window,
        max_window_layers=c.n_layer,  # our layer_types say which layers slide
        layer_types=hf_layer_types(c),
    )
    if family == "qwen3":
        out["attention_bias"] = c.attention_bias
    return out


def mistral_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``MistralConfig`` dict: every layer sliding (or none)."""
    refuse_variants(c, "mistral", ("sliding_window",))
    _no_partial(c, "mistral")
    _need(c, "mistral", attention_bias=False, mlp_bias=False)
    return {**shape_to_hf(c, "mistral", "MistralForCausalLM"), "sliding_window": c.sliding_window}


def phi3_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers ``Phi3Config`` dict (partial RoPE; every layer sliding, or none)."""
    refuse_variants(c, "phi3", ("sliding_window",))
    _need(c, "phi3", attention_bias=False, mlp_bias=False)
    if c.rope_scaling is not None:
        raise LmarchError("the Hugging Face phi3 layout has no RoPE scaling but LongRoPE")
    out = shape_to_hf(c, "phi3", "Phi3ForCausalLM")
    out["rope_scaling"] = None
    out.update(partial_rotary_factor=c.partial_rotary_factor, sliding_window=c.sliding_window)
    return out


@dataclass(frozen=True)
class HFDecoder:
    """One Hugging Face family read into a Llama: its config reader and whether its weights
    keep q/k/v and gate/up fused (Phi-3)."""

    config_from_hf: Callable[[dict[str, Any], str], LlamaConfig]
    fused: bool = False


def _families() -> dict[str, HFDecoder]:
    from lmarch.weights.hf_gemma import gemma2_config_from_hf, gemma3_config_from_hf

    return {
        "llama": HFDecoder(llama_config_from_hf),
        "qwen2": HFDecoder(qwen2_config_from_hf),
        "qwen3": HFDecoder(qwen3_config_from_hf),
        "mistral": HFDecoder(mistral_config_from_hf),
        "phi3": HFDecoder(phi3_config_from_hf, fused=True),
        "gemma2": HFDecoder(gemma2_config_from_hf),
        "gemma3_text": HFDecoder(gemma3_config_from_hf),
    }


# the model_type values :func:`load_hf_decoder` reads
DECODER_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")


def decoder_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from the config.json of any family of :data:`DECODER_TYPES`."""
    kind = hf.get("model_type")
    if kind == "gemma3":
        raise LmarchError(
            f"{where}: model_type 'gemma3' is the multimodal Gemma 3 (text and images)",
            hint="lmarch reads the text-only Gemma3ForCausalLM folders (model_type gemma3_text)",
        )
    families = _families()
    if kind not in families:
        raise LmarchError(
            f"{where}: model_type {kind!r} is not a decoder lmarch reads",
            hint=f"one of {list(DECODER_TYPES)}",
        )
    return families[kind].config_from_hf(hf, where)


def load_hf_decoder(folder: str | Path) -> Llama:
    """A Llama holding the weights of a Hugging Face LLaMA, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2
    or Gemma 3 (text) folder, recognised by its ``model_type``."""
    hf = read_hf_config(folder)
    config = decoder_config_from_hf(hf, str(Path(folder) / "config.json"))
    return load_decoder_weights(folder, config, fused=_families()[hf["model_type"]].fused)


def decoder_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """A transformers config dict for ``c``, in the layout of the family that expresses it:
    Gemma 2 / 3 for Gemma's options, Qwen3 for QK-norm, Qwen2 for biases on q/k/v alone,
    Phi-3 for partial RoPE, Mistral for a sliding window on every layer, LLaMA otherwise."""
    from lmarch.weights.hf_gemma import gemma_config_to_hf

    out_bias = c.attention_bias if c.attention_out_bias is None else c.attention_out_bias
    if c.sandwich_norm or c.norm_unit_offset or c.embedding_scale:
        return gemma_config_to_hf(c)
    if c.qk_norm or (c.attention_bias and not out_bias):
        return qwen_config_to_hf(c)
    if c.partial_rotary_factor != 1.0:
        return phi3_config_to_hf(c)
    if c.sliding_window is not None and all(c.sliding_layers):
        return mistral_config_to_hf(c)
    if c.sliding_window is not None:  # some layers slide: Qwen2's layout has layer_types
        return qwen_config_to_hf(c)
    return llama_config_to_hf(c)


def save_hf_decoder(model: Llama, folder: str | Path) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face folder of the family that expresses its config
    (:func:`decoder_config_to_hf`); returns the config.json written."""
    hf = decoder_config_to_hf(model.config)
    save_decoder(model, folder, hf, fused=_families()[hf["model_type"]].fused)
    return hf


__all__ = [
    "DECODER_TYPES",
    "LLAMA_FIELDS",
    "MISTRAL_FIELDS",
    "PHI3_FIELDS",
    "QWEN2_FIELDS",
    "QWEN3_FIELDS",
    "decoder_config_from_hf",
    "decoder_config_to_hf",
    "load_hf_decoder",
    "mistral_config_from_hf",
    "phi3_config_from_hf",
    "qwen2_config_from_hf",
    "qwen3_config_from_hf",
    "save_hf_decoder",
]
