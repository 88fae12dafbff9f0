"""T5 and mT5 in the Hugging Face layout (``T5ForConditionalGeneration``,
``MT5ForConditionalGeneration``): names, config and folders.

Every field of their config either changes our model as it changes transformers' or is refused
by name (:data:`T5_FIELDS`). Their q/k/v projections are three matrices (ours one fused
``qkv``), the cross-attention's k/v two (ours one ``kv``), the gated unit's wi_0/wi_1 two (ours
one ``gate_up``); rows are concatenated on the way in and split on the way out.

The output head follows transformers 5: a file with an ``lm_head.weight`` that differs from the
shared embedding has an untied head, otherwise the head is the embedding. T5's rescaling of the
decoder output by d_model^-0.5 is on unless ``scale_decoder_outputs`` (or, in files written by
transformers 4, ``tie_word_embeddings``) is false; mT5 never rescales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.models.t5 import T5, T5Config
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

_E = "encoder.block.{i}.layer."
_D = "decoder.block.{i}.layer."

_COMMON = [
    Rule("shared.weight", "shared.weight"),
    Rule(
        "encoder.relative_bias.embedding.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    Rule("encoder.blocks.{i}.norm_attn.weight", _E + "0.layer_norm.weight"),
    Rule("encoder.blocks.{i}.attn.qkv.weight", tuple(_E + f"0.SelfAttention.{p}.weight" for p in "qkv")),
    Rule("encoder.blocks.{i}.attn.out.weight", _E + "0.SelfAttention.o.weight"),
    Rule("encoder.blocks.{i}.norm_ffn.weight", _E + "1.layer_norm.weight"),
    Rule("encoder.norm.weight", "encoder.final_layer_norm.weight"),
    Rule(
        "decoder.relative_bias.embedding.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    Rule("decoder.blocks.{i}.norm_self.weight", _D + "0.layer_norm.weight"),
    Rule("decoder.blocks.{i}.self_attn.qkv.weight", tuple(_D + f"0.SelfAttention.{p}.weight" for p in "qkv")),
    Rule("decoder.blocks.{i}.self_attn.out.weight", _D + "0.SelfAttention.o.weight"),
    Rule("decoder.blocks.{i}.norm_cross.weight", _D + "1.layer_norm.weight"),
    Rule("decoder.blocks.{i}.cross_attn.q.weight", _D + "1.EncDecAttention.q.weight"),
    Rule("decoder.blocks.{i}.cross_attn.kv.weight", tuple(_D + f"1.EncDecAttention.{p}.weight" for p in "kv")),
    Rule("decoder.blocks.{i}.cross_attn.out.weight", _D + "1.EncDecAttention.o.weight"),
    Rule("decoder.blocks.{i}.norm_ffn.weight", _D + "2.layer_norm.weight"),
    Rule("decoder.norm.weight", "decoder.final_layer_norm.weight"),
]  # fmt: skip


def _ffn_rules(stack: str, layer: str, gated: bool) -> list[Rule]:
    ours = f"{stack}.blocks.{{i}}.ffn."
    theirs = f"{stack}.block.{{i}}.layer.{layer}.DenseReluDense."
    if gated:
        return [
            Rule(ours + "gate_up.weight", (theirs + "wi_0.weight", theirs + "wi_1.weight")),
            Rule(ours + "down.weight", theirs + "wo.weight"),
        ]
    return [
        Rule(ours + "fc_in.weight", theirs + "wi.weight"),
        Rule(ours + "fc_out.weight", theirs + "wo.weight"),
    ]


# copies of the shared embedding, and a bias table transformers 4 once saved but never used
_IGNORE = [
    r"^(encoder|decoder)\.embed_tokens\.weight$",
    r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",
]


def t5_map(config: T5Config) -> WeightMap:
    """The name map for ``config``, layer counts aside (see :func:`t5_to_ours`): the
    feed-forward's tensors by its kind, the head unless it is tied."""
    rules = list(_COMMON)
    rules += _ffn_rules("encoder", "1", config.gated_ffn)
    rules += _ffn_rules("decoder", "2", config.gated_ffn)
    ignore = list(_IGNORE)
    if config.tie_embeddings:
        ignore.append(r"^lm_head\.weight$")
    else:
        rules.append(Rule("lm_head.weight", "lm_head.weight"))
    return WeightMap(rules, ignore=ignore)


def _split_map(config: T5Config) -> tuple[WeightMap, WeightMap]:
    """The map's rules for the encoder's layers and for the rest (the decoder may have another
    number of layers, so each half is expanded on its own count)."""
    full = t5_map(config)
    enc = [r for r in full.rules if r.ours.startswith("encoder.blocks.")]
    rest = [r for r in full.rules if not r.ours.startswith("encoder.blocks.")]
    return WeightMap(enc), WeightMap(rest, ignore=[p.pattern for p in full.ignore])


def t5_to_ours(config: T5Config, theirs: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Their tensors renamed to ours (the encoder's and decoder's layer counts may differ)."""
    enc_map, rest_map = _split_map(config)
    enc_names = {r.at_layer(i).parts[k] for r in enc_map.rules for i in range(config.n_layer)
                 for k in range(len(r.parts))}  # fmt: skip
    ours = enc_map.to_ours(
        {k: v for k, v in theirs.items() if k in enc_names}, config.n_layer, where
    )
    rest = {k: v for k, v in theirs.items() if k not in enc_names}
    ours.update(rest_map.to_ours(rest, config.decoder_layers, where))
    return ours


def split_sizes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Row counts of the parts of each fused tensor, for exporting."""
    inner = config.n_head * config.head_dim
    ff = config.intermediate_size
    return {
        "encoder.blocks.{i}.attn.qkv.weight": (inner, inner, inner),
        "decoder.blocks.{i}.self_attn.qkv.weight": (inner, inner, inner),
        "decoder.blocks.{i}.cross_attn.kv.weight": (inner, inner),
        "encoder.blocks.{i}.ffn.gate_up.weight": (ff, ff),
        "decoder.blocks.{i}.ffn.gate_up.weight": (ff, ff),
    }


def t5_to_theirs(model: T5) -> dict[str, Tensor]:
    """The model's tensors under transformers' names."""
    c = model.config
    enc_map, rest_map = _split_map(c)
    ours = unique_state_dict(model)
    enc = {k: v for k, v in ours.items() if k.startswith("encoder.blocks.")}
    rest = {k: v for k, v in ours.items() if not k.startswith("encoder.blocks.")}
    sizes = split_sizes(c)
    out = enc_map.to_theirs(enc, c.n_layer, split_sizes=sizes)
    out.update(rest_map.to_theirs(rest, c.decoder_layers, split_sizes=sizes))
    return out


# transformers' activation names (the part of feed_forward_proj after "gated-") -> ours
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
}
_ACTIVATIONS_TO_HF = {
    "relu": "relu",
    "gelu": "gelu_python",
    "gelu_tanh": "gelu_new",
    "silu": "silu",
    "tanh": "tanh",
}

T5_FIELDS = HFConfigFields(
    "t5",
    implemented=(
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
        "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
        "layer_norm_epsilon", "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs",
        "n_positions",  # the training length of the original checkpoints: our block_size
    ),
    inert=(
        *COMMON_INERT,
        "initializer_factor",  # initialisation only
        "dense_act_fn", "is_gated_act",  # recomputed by transformers from feed_forward_proj
        "classifier_dropout",  # the classification head, not loaded here
        "is_decoder",  # transformers sets it per stack
    ),
    refused={"is_encoder_decoder": (True,)},
)  # fmt: skip


def _feed_forward(hf: dict[str, Any], default: str, where: str) -> tuple[str, bool]:
    """(our activation, gated) from ``feed_forward_proj`` ("relu", "gated-gelu", ...)."""
    proj = hf.get("feed_forward_proj", default)
    parts = proj.split("-") if isinstance(proj, str) else []
    gated = len(parts) == 2 and parts[0] == "gated"
    act = parts[-1] if parts and (len(parts) == 1 or gated) else None
    if proj == "gated-gelu":
        act = "gelu_new"  # transformers' choice for the T5 v1.1 checkpoints
    if act not in _ACTIVATIONS:
        raise refuse(
            where,
            "t5",
            "feed_forward_proj",
            proj,
            f"ACT or gated-ACT, ACT one of {sorted(_ACTIVATIONS)}",
        )
    return _ACTIVATIONS[act], gated


# our T5Config field -> the config.json key it comes from
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
    "n_layer": "num_layers",
    "n_decoder_layer": "num_decoder_layers",
    "n_head": "num_heads",
    "n_embd": "d_model",
    "head_dim": "d_kv",
    "intermediate_size": "d_ff",
    "relative_attention_num_buckets": "relative_attention_num_buckets",
    "relative_attention_max_distance": "relative_attention_max_distance",
    "layer_norm_eps": "layer_norm_epsilon",
    "dropout": "dropout_rate",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
    "decoder_start_token_id": "decoder_start_token_id",
}


def t5_config_from_hf(
    hf: dict[str, Any], where: str = "config.json", untied_head: bool = False
) -> T5Config:
    """Our T5Config from a transformers ``T5Config`` / ``MT5Config`` dict (``untied_head``: the
    weights carry their own ``lm_head.weight``). A field lmarch does not implement is refused by
    name; missing fields take transformers' defaults."""
    kind = hf.get("model_type", "t5")
    if kind not in ("t5", "mt5"):
        raise refuse(where, "t5", "model_type", kind, "'t5' or 'mt5'")
    T5_FIELDS.check(hf, where)
    mt5 = kind == "mt5"
    activation, gated = _feed_forward(hf, "gated-gelu" if mt5 else "relu", where)
    if mt5:
        scale = False
    elif "scale_decoder_outputs" in hf:
        scale = hf["scale_decoder_outputs"]
    else:
        scale = hf.get("tie_word_embeddings", True) is not False
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    layers = hf.get("num_layers", 8 if mt5 else 6)
    decoder_layers = hf.get("num_decoder_layers")  # None or the encoder's count: symmetric
    return build_config(
        lambda: T5Config(
            vocab_size=hf.get("vocab_size", 250112 if mt5 else 32128),
            block_size=hf.get("n_positions", 512),
            n_layer=layers,
            n_decoder_layer=None if decoder_layers == layers else decoder_layers,
            n_head=hf.get("num_heads", 6 if mt5 else 8),
            n_embd=hf.get("d_model", 512),
            head_dim=hf.get("d_kv", 64),
            intermediate_size=hf.get("d_ff", 1024 if mt5 else 2048),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            activation=activation,
            gated_ffn=gated,
            tie_embeddings=not untied_head,
            scale_output=scale,
            dropout=hf.get("dropout_rate", 0.1),
            pad_token_id=0 if pad is None else pad,
            eos_token_id=eos,
            decoder_start_token_id=(0 if pad is None else pad) if start is None else start,
            variant=kind,
        ),
        _HF_NAMES,
        where,
        "t5",
    )


def _feed_forward_proj(c: T5Config) -> str:
    """transformers' ``feed_forward_proj`` for our activation (canonical names first)."""
    if c.gated_ffn and c.activation == "gelu_tanh":
        return "gated-gelu"  # what the v1.1 and mT5 configs say
    if not c.gated_ffn and c.activation == "gelu":
        return "gelu"
    if c.activation not in _ACTIVATIONS_TO_HF:
        raise LmarchError(f"the Hugging Face T5 layout has no activation {c.activation!r}")
    name = _ACTIVATIONS_TO_HF[c.activation]
    return f"gated-{name}" if c.gated_ffn else name


def t5_config_to_hf(c: T5Config) -> dict[str, Any]:
    """A transformers ``T5Config`` (or ``MT5Config``) dict for our config."""
    if c.variant == "mt5" and c.scale_output:
        raise LmarchError(
            "transformers' mT5 never rescales the decoder output",
            hint="write it as variant 't5' (T5ForConditionalGeneration), which can",
        )
    proj = _feed_forward_proj(c)
    mt5 = c.variant == "mt5"
    out: dict[str, Any] = {
        "architectures": ["MT5ForConditionalGeneration" if mt5 else "T5ForConditionalGeneration"],
        "model_type": c.variant,
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "d_model": c.n_embd,
        "d_kv": c.head_dim,
        "d_ff": c.intermediate_size,
        "num_layers": c.n_layer,
        "num_decoder_layers": c.decoder_layers,
        "num_heads": c.n_head,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout,
        "layer_norm_epsilon": c.layer_norm_eps,
        "feed_forward_proj": proj,
        # transformers 4 reads this as "tied and rescaled"; 5 reads the rescaling from it
        # unless scale_decoder_outputs says otherwise, and the tying from the weights
        "tie_word_embeddings": c.scale_output,
        "is_encoder_decoder": True,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
    }
    if not mt5:
        out["scale_decoder_outputs"] = c.scale_output
    return out


def _untied_head(tensors: dict[str, Tensor]) -> bool:
    """Whether the file's output head is a matrix of its own (transformers 5 unties it then)."""
    head = tensors.get("lm_head.weight")
    shared = tensors.get("shared.weight")
    return head is not None and (shared is None or not torch.equal(head, shared))


def load_hf_t5(folder: str | Path) -> T5:
    """A T5 holding the weights of a Hugging Face T5 or mT5 folder (sharded or not)."""
    tensors = read_hf_weights(folder)
    if "shared.weight" not in tensors:  # some exports keep only the encoder's copy
        for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if copy in tensors:
                tensors["shared.weight"] = tensors[copy]
                break
    where = str(Path(folder) / "config.json")
    config = t5_config_from_hf(read_hf_config(folder), where, untied_head=_untied_head(tensors))
    ours = t5_to_ours(config, tensors, where=str(folder))
    return build_from_weights(lambda: T5(config), ours, str(folder))


def save_hf_t5(model: T5, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face folder that ``T5ForConditionalGeneration`` (or
    ``MT5ForConditionalGeneration``) loads."""
    write_hf_folder(folder, t5_config_to_hf(model.config), t5_to_theirs(model))


__all__ = [
    "T5_FIELDS",
    "load_hf_t5",
    "save_hf_t5",
    "split_sizes",
    "t5_config_from_hf",
    "t5_config_to_hf",
    "t5_map",
    "t5_to_ours",
    "t5_to_theirs",
]
