"""BART and Marian in the Hugging Face layout (``BartForConditionalGeneration``,
``MarianMTModel``): names, config fields and folders.

Their q/k/v projections are separate matrices; ours are fused (self-attention ``qkv``,
cross-attention ``q`` + ``kv``), so rows are concatenated on the way in and split on the way
out. The encoder and decoder may have different depths, so layer rules name their stack.

Token tables, as transformers 5 ties them: ``tie_word_embeddings`` true ties the encoder's,
the decoder's and the output head to one table (``model.shared``; Marian's
``share_encoder_decoder_embeddings`` false keeps the encoder's apart and ties only the decoder's
to the head); ``tie_word_embeddings`` false unties all three. Older files may also store the
aliases of a tied table, which are read as the same table.

Every field of their configs either changes our model as it changes transformers' or is
refused by name (:data:`BART_FIELDS`, :data:`MARIAN_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.models.bart import Bart, BartConfig
from lmarch.nn.position import sinusoidal_table
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

_E, _D = "model.encoder.", "model.decoder."
_EL, _DL = _E + "layers.{i}.", _D + "layers.{i}."


def _linear(ours: str, theirs: str | tuple[str, ...]) -> list[Rule]:
    """Weight and bias rules of one (possibly fused) Linear."""
    parts = theirs if isinstance(theirs, tuple) else (theirs,)
    return [
        Rule(
            f"{ours}.{w}", tuple(f"{p}.{w}" for p in parts) if len(parts) > 1 else f"{parts[0]}.{w}"
        )
        for w in ("weight", "bias")
    ]


_ENCODER_LAYER = [
    *_linear("encoder.blocks.{i}.attn.qkv", tuple(_EL + f"self_attn.{p}_proj" for p in "qkv")),
    *_linear("encoder.blocks.{i}.attn.out", _EL + "self_attn.out_proj"),
    *_linear("encoder.blocks.{i}.norm_attn", _EL + "self_attn_layer_norm"),
    *_linear("encoder.blocks.{i}.ffn.fc_in", _EL + "fc1"),
    *_linear("encoder.blocks.{i}.ffn.fc_out", _EL + "fc2"),
    *_linear("encoder.blocks.{i}.norm_ffn", _EL + "final_layer_norm"),
]
_DECODER_LAYER = [
    *_linear("decoder.blocks.{i}.self_attn.qkv", tuple(_DL + f"self_attn.{p}_proj" for p in "qkv")),
    *_linear("decoder.blocks.{i}.self_attn.out", _DL + "self_attn.out_proj"),
    *_linear("decoder.blocks.{i}.norm_self", _DL + "self_attn_layer_norm"),
    *_linear("decoder.blocks.{i}.cross_attn.q", _DL + "encoder_attn.q_proj"),
    *_linear(
        "decoder.blocks.{i}.cross_attn.kv", tuple(_DL + f"encoder_attn.{p}_proj" for p in "kv")
    ),
    *_linear("decoder.blocks.{i}.cross_attn.out", _DL + "encoder_attn.out_proj"),
    *_linear("decoder.blocks.{i}.norm_cross", _DL + "encoder_attn_layer_norm"),
    *_linear("decoder.blocks.{i}.ffn.fc_in", _DL + "fc1"),
    *_linear("decoder.blocks.{i}.ffn.fc_out", _DL + "fc2"),
    *_linear("decoder.blocks.{i}.norm_ffn", _DL + "final_layer_norm"),
]
_BART_EMBEDDINGS = [
    Rule("encoder.pos_emb.weight", _E + "embed_positions.weight"),
    *_linear("encoder.emb_norm", _E + "layernorm_embedding"),
    Rule("decoder.pos_emb.weight", _D + "embed_positions.weight"),
    *_linear("decoder.emb_norm", _D + "layernorm_embedding"),
]
_SHARED, _ENC_TOK, _DEC_TOK, _HEAD = (
    "model.shared.weight", _E + "embed_tokens.weight", _D + "embed_tokens.weight", "lm_head.weight"
)  # fmt: skip
# Marian's sinusoid tables (older files store them; checked, not loaded)
_MARIAN_POSITIONS = (_E + "embed_positions.weight", _D + "embed_positions.weight")


class EncoderDecoderMap(WeightMap):
    """A :class:`WeightMap` whose ``{i}`` rules run over the encoder's layers for names under
    ``encoder.`` and over the decoder's (``n_decoder_layers``) for names under ``decoder.``;
    ``n_layers`` in the calls is the encoder's depth."""

    def __init__(self, rules: list[Rule], ignore: list[str], n_decoder_layers: int) -> None:
        super().__init__(rules, ignore)
        self.n_decoder_layers = n_decoder_layers

    def _iter_expanded(self, n_layers: int) -> Iterator[Rule]:
        for r in self.rules:
            if "{i}" not in r.ours:
                yield r
                continue
            n = self.n_decoder_layers if r.ours.startswith("decoder.") else n_layers
            yield from (r.at_layer(i) for i in range(n))


def _escape(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


def bart_map(c: BartConfig) -> EncoderDecoderMap:
    """The name map for ``c``: layers, BART's learned positions and embedding norms, and the
    token tables as ``c`` shares and ties them (the ignored names are aliases of a tied
    table, or Marian's position tables)."""
    rules = [*_ENCODER_LAYER, *_DECODER_LAYER, Rule("logits_bias", "final_logits_bias")]
    ignore: list[str] = []
    if c.variant == "bart":
        rules += _BART_EMBEDDINGS
    else:
        ignore += [_escape(n) for n in _MARIAN_POSITIONS]
    if c.share_embeddings:
        rules.append(Rule("tok_emb.weight", _SHARED))
        ignore += [_escape(_ENC_TOK), _escape(_DEC_TOK)]
    else:
        rules += [Rule("tok_emb.weight", _ENC_TOK), Rule("tgt_emb.weight", _DEC_TOK)]
        ignore.append(_escape(_SHARED))
    if c.tie_embeddings:
        ignore.append(_escape(_HEAD))
    else:
        rules.append(Rule("lm_head.weight", _HEAD))
    return EncoderDecoderMap(rules, ignore, c.n_decoder_layer)


# ---- config.json ----------------------------------------------------------------------------------

_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
}
_ACTIVATIONS_TO_HF = {
    "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish", "tanh": "tanh",
}  # fmt: skip

_SHAPE = (
    "vocab_size", "max_position_embeddings", "encoder_layers", "encoder_ffn_dim",
    "encoder_attention_heads", "decoder_layers", "decoder_ffn_dim", "decoder_attention_heads",
    "d_model", "activation_function", "scale_embedding", "tie_word_embeddings",
    "forced_bos_token_id", "forced_eos_token_id",  # generation: read into our config
)  # fmt: skip
_INERT = (
    *COMMON_INERT,
    "dropout", "attention_dropout", "activation_dropout",  # training only
    "encoder_layerdrop", "decoder_layerdrop",  # training only (whole layers skipped)
    "init_std", "classifier_dropout", "num_hidden_layers", "num_attention_heads", "hidden_size",
)  # fmt: skip
_REFUSED = {"is_encoder_decoder": (True,), "is_decoder": (False,)}

BART_FIELDS = HFConfigFields("bart", implemented=_SHAPE, inert=_INERT, refused=_REFUSED)
MARIAN_FIELDS = HFConfigFields(
    "marian",
    implemented=(*_SHAPE, "decoder_vocab_size", "share_encoder_decoder_embeddings"),
    inert=_INERT,
    refused=_REFUSED,
)
_FIELDS = {"bart": BART_FIELDS, "marian": MARIAN_FIELDS}
# transformers' defaults where a config.json leaves a field out
_DEFAULTS = {
    "bart": dict(
        vocab_size=50265, d_model=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2, activation_function="gelu",
    ),
    "marian": dict(
        vocab_size=58101, d_model=1024, pad_token_id=58100, bos_token_id=None, eos_token_id=0,
        decoder_start_token_id=58100, forced_eos_token_id=0, activation_function="gelu",
    ),
}  # fmt: skip

# our BartConfig field -> the config.json key it comes from
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "target_vocab_size": "decoder_vocab_size",
    "block_size": "max_position_embeddings",
    "n_encoder_layer": "encoder_layers",
    "n_decoder_layer": "decoder_layers",
    "n_head": "encoder_attention_heads",
    "n_decoder_head": "decoder_attention_heads",
    "n_embd": "d_model",
    "intermediate_size": "encoder_ffn_dim",
    "decoder_intermediate_size": "decoder_ffn_dim",
    "scale_embedding": "scale_embedding",
    "tie_embeddings": "tie_word_embeddings",
    "share_embeddings": "share_encoder_decoder_embeddings",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "decoder_start_token_id": "decoder_start_token_id",
    "forced_bos_token_id": "forced_bos_token_id",
    "forced_eos_token_id": "forced_eos_token_id",
}


# the token ids a generation_config.json may set (it wins over config.json, as in transformers;
# pad_token_id stays config.json's: it is the embeddings' padding row)
_GENERATION_KEYS = (
    "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id",
    "forced_eos_token_id",
)  # fmt: skip


def _single_token(value: Any, key: str, where: str, family: str) -> Any:
    """A token id field as one int (or None): a one-element list is read as its element."""
    if isinstance(value, list):
        if len(value) != 1:
            raise refuse(where, family, key, value, f"a single {key}")
        value = value[0]
    return value


def bart_config_from_hf(
    hf: dict[str, Any], where: str = "config.json", generation: dict[str, Any] | None = None
) -> BartConfig:
    """Our BartConfig from a transformers ``BartConfig`` or ``MarianConfig`` dict (its
    ``model_type`` picks the variant). ``generation`` (a ``generation_config.json``) overrides
    the token ids generation uses, as ``from_pretrained`` does. Missing fields take
    transformers' defaults; a field lmarch does not implement is refused by name."""
    family = hf.get("model_type")
    if family not in _FIELDS:
        raise refuse(where, "bart", "model_type", family, "'bart' or 'marian'")
    _FIELDS[family].check(hf, where)
    get = {**_DEFAULTS[family], **hf}
    get.update((k, v) for k, v in (generation or {}).items() if k in _GENERATION_KEYS)
    act = get["activation_function"]
    if act not in _ACTIVATIONS:
        raise refuse(where, family, "activation_function", act, f"one of {sorted(_ACTIVATIONS)}")
    if get.get("pad_token_id") is None:
        raise refuse(where, family, "pad_token_id", None, "a pad_token_id (the padding row)")
    tie = get.get("tie_word_embeddings", True)
    share = get.get("share_encoder_decoder_embeddings", True) if family == "marian" else True
    vocab = get["vocab_size"]
    target = get.get("decoder_vocab_size") if family == "marian" else None
    tokens = {
        k: _single_token(get.get(k), k, where, family)
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
    }
    forced = {
        k: _single_token(get.get(k), k, where, family)
        for k in ("forced_bos_token_id", "forced_eos_token_id")
    }
    return build_config(
        lambda: BartConfig(
            variant=family,
            vocab_size=vocab,
            # transformers 5 unties all three tables when tie_word_embeddings is false
            target_vocab_size=None if share or target in (None, vocab) else target,
            block_size=get.get("max_position_embeddings", 1024),
            n_encoder_layer=get.get("encoder_layers", 12),
            n_decoder_layer=get.get("decoder_layers", 12),
            n_head=get.get("encoder_attention_heads", 16),
            n_decoder_head=get.get("decoder_attention_heads", 16),
            n_embd=get["d_model"],
            intermediate_size=get.get("encoder_ffn_dim", 4096),
            decoder_intermediate_size=get.get("decoder_ffn_dim", 4096),
            activation=_ACTIVATIONS[act],
            dropout=get.get("dropout", 0.1),
            attention_dropout=get.get("attention_dropout", 0.0),
            share_embeddings=share and tie is True,
            tie_embeddings=tie,
            scale_embedding=get.get("scale_embedding", False),
            **tokens,
            **forced,
        ),
        _HF_NAMES,
        where,
        family,
    )


def bart_config_to_hf(c: BartConfig) -> dict[str, Any]:
    """A transformers ``BartConfig`` / ``MarianConfig`` dict for our config. A model with
    separate source and target tables but a head tied to the target one has no BART form."""
    if c.activation not in _ACTIVATIONS_TO_HF:
        raise LmarchError(f"the Hugging Face {c.variant} layout has no activation {c.activation!r}")
    if c.variant == "bart" and c.tie_embeddings and not c.share_embeddings:
        raise LmarchError(
            "BART's Hugging Face layout ties the output head only together with one shared "
            "token table; this model has separate source and target tables",
            hint="set share_embeddings=true or tie_embeddings=false, or use variant marian",
        )
    out: dict[str, Any] = {
        "architectures": [
            "BartForConditionalGeneration" if c.variant == "bart" else "MarianMTModel"
        ],
        "model_type": c.variant,
        "is_encoder_decoder": True,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.block_size,
        "encoder_layers": c.n_encoder_layer,
        "decoder_layers": c.n_decoder_layer,
        "encoder_attention_heads": c.encoder_heads,
        "decoder_attention_heads": c.decoder_heads,
        "d_model": c.n_embd,
        "encoder_ffn_dim": c.encoder_ffn,
        "decoder_ffn_dim": c.decoder_ffn,
        "activation_function": _ACTIVATIONS_TO_HF[c.activation],
        "dropout": c.dropout,
        "attention_dropout": c.attention_dropout,
        "scale_embedding": c.scale_embedding,
        "tie_word_embeddings": c.tie_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
        "forced_bos_token_id": c.forced_bos_token_id,
        "forced_eos_token_id": c.forced_eos_token_id,
    }
    if c.variant == "marian":
        out["decoder_vocab_size"] = c.decoder_vocab_size
        out["share_encoder_decoder_embeddings"] = c.share_embeddings
    return out


def _read_generation_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LmarchError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _resolve_aliases(c: BartConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Files of older transformers versions keep a tied table under another of its names:
    the shared table only as the encoder's, or untied tables only as ``model.shared``."""
    tensors = dict(tensors)
    if c.share_embeddings and _SHARED not in tensors and _ENC_TOK in tensors:
        tensors[_SHARED] = tensors.pop(_ENC_TOK)
    if not c.share_embeddings and _SHARED in tensors:
        for name in (_ENC_TOK, _DEC_TOK):
            tensors.setdefault(name, tensors[_SHARED])
    return tensors


def _check_marian_positions(c: BartConfig, tensors: dict[str, Tensor], where: str) -> None:
    """Marian's position tables are fixed sinusoids; a file that stores others is refused."""
    for name in _MARIAN_POSITIONS:
        if name in tensors:
            table = sinusoidal_table(tensors[name].shape[0], c.n_embd, layout="halves")
            stored = tensors[name].float()
            if stored.shape != table.shape or not torch.allclose(stored, table, atol=1e-5):
                raise LmarchError(
                    f"{where}: {name} is not Marian's sinusoid table; lmarch computes the "
                    "positions and cannot load other values"
                )


def load_hf_bart(folder: str | Path) -> Bart:
    """A :class:`Bart` (BART or Marian) holding the weights of a Hugging Face folder."""
    folder = Path(folder)
    where = str(folder / "config.json")
    config = bart_config_from_hf(read_hf_config(folder), where, _read_generation_config(folder))
    tensors = _resolve_aliases(config, read_hf_weights(folder))
    if config.variant == "marian":
        _check_marian_positions(config, tensors, str(folder))
    ours = bart_map(config).to_ours(tensors, config.n_encoder_layer, where=str(folder))
    return build_from_weights(lambda: Bart(config), ours, str(folder))


def save_hf_bart(model: Bart, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face folder that ``BartForConditionalGeneration`` (or
    ``MarianMTModel``) loads. An untied head is written as transformers 5 reads
    ``tie_word_embeddings`` false: every table under its own name (a shared one copied)."""
    c = model.config
    hf_config = bart_config_to_hf(c)
    state = unique_state_dict(model)
    mapped = c
    if c.share_embeddings and not c.tie_embeddings:
        state["tgt_emb.weight"] = state["tok_emb.weight"].clone()
        mapped = dataclasses.replace(c, share_embeddings=False)
    tensors = bart_map(mapped).to_theirs(state, c.n_encoder_layer)
    if not c.tie_embeddings and (c.variant == "bart" or c.share_embeddings):
        tensors[_SHARED] = tensors[_ENC_TOK].clone()  # transformers keeps it, unused
    write_hf_folder(folder, hf_config, tensors)
