"""GPT-2 in the Hugging Face layout (``GPT2LMHeadModel``): names, config and folders.

Every field of ``GPT2Config`` either changes our model as it changes transformers' or is
refused by name (:data:`GPT2_FIELDS`). Their attention and MLP projections are ``Conv1D``
modules storing W as [in, out] (x @ W), while ours are ``nn.Linear`` storing [out, in]; those
matrices are transposed on the way across. Their fused ``c_attn`` has the same row order as
our ``qkv`` (all of Q, then K, then V).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
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

_T, _H = "transformer.", "transformer.h.{i}."
_MASKS = r"\.attn\.(masked_)?bias$"

GPT2_MAP = WeightMap(
    [
        Rule("tok_emb.weight", _T + "wte.weight"),
        Rule("pos_emb.weight", _T + "wpe.weight"),
        Rule("blocks.{i}.norm_attn.weight", _H + "ln_1.weight"),
        Rule("blocks.{i}.norm_attn.bias", _H + "ln_1.bias"),
        Rule("blocks.{i}.attn.qkv.weight", _H + "attn.c_attn.weight", transpose=True),
        Rule("blocks.{i}.attn.qkv.bias", _H + "attn.c_attn.bias"),
        Rule("blocks.{i}.attn.out.weight", _H + "attn.c_proj.weight", transpose=True),
        Rule("blocks.{i}.attn.out.bias", _H + "attn.c_proj.bias"),
        Rule("blocks.{i}.norm_ffn.weight", _H + "ln_2.weight"),
        Rule("blocks.{i}.norm_ffn.bias", _H + "ln_2.bias"),
        Rule("blocks.{i}.ffn.fc_in.weight", _H + "mlp.c_fc.weight", transpose=True),
        Rule("blocks.{i}.ffn.fc_in.bias", _H + "mlp.c_fc.bias"),
        Rule("blocks.{i}.ffn.fc_out.weight", _H + "mlp.c_proj.weight", transpose=True),
        Rule("blocks.{i}.ffn.fc_out.bias", _H + "mlp.c_proj.bias"),
        Rule("norm_f.weight", _T + "ln_f.weight"),
        Rule("norm_f.bias", _T + "ln_f.bias"),
    ],
    # lm_head.weight is tied to wte; the attn.bias / masked_bias buffers of old checkpoints are masks.
    ignore=[r"^lm_head\.weight$", _MASKS],
)


def gpt2_map(config: GPTConfig) -> WeightMap:
    """The name map for ``config``: with its own output head when it is not tied to ``wte``."""
    if config.tie_embeddings:
        return GPT2_MAP
    return WeightMap(GPT2_MAP.rules + [Rule("lm_head.weight", "lm_head.weight")], ignore=[_MASKS])


# transformers' activation names -> ours (tanh-approximated GELU under three names)
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
}
_ACTIVATIONS_TO_HF = {
    "gelu_tanh": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "tanh": "tanh",
}

GPT2_FIELDS = HFConfigFields(
    "gpt2",
    implemented=(
        "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
        "activation_function", "layer_norm_epsilon", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "tie_word_embeddings",
        # transformers' aliases of n_embd, n_positions, n_head, n_layer
        "hidden_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
    ),
    inert=(
        *COMMON_INERT,
        "resid_pdrop", "embd_pdrop", "attn_pdrop",  # dropout: training only
        # GPT2DoubleHeadsModel's multiple-choice head, not the language-model head
        "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
        "summary_first_dropout", "summary_last_dropout", "classifier_dropout",
        "reorder_and_upcast_attn",  # the same scores in float32 (an fp16 overflow guard)
        "n_ctx",  # legacy copy of n_positions, read by nothing
    ),
)  # fmt: skip

# our GPTConfig field -> the config.json key it comes from
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "n_inner": "n_inner",
    "layer_norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "scale_attn_weights": "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
}


def _get(hf: dict[str, Any], key: str, alias: str, default: Any) -> Any:
    """``hf[key]``, else its transformers alias, else transformers' default."""
    return hf[key] if key in hf else hf.get(alias, default)


def gpt_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> GPTConfig:
    """Our GPTConfig from a transformers ``GPT2Config`` dict; a field lmarch does not implement
    (at a value other than transformers' default) is refused by name. Missing fields take
    transformers' defaults, as ``GPT2Config`` does."""
    GPT2_FIELDS.check(hf, where)
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise refuse(where, "gpt2", "activation_function", act, f"one of {sorted(_ACTIVATIONS)}")
    return build_config(
        lambda: GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=_get(hf, "n_positions", "max_position_embeddings", 1024),
            n_layer=_get(hf, "n_layer", "num_hidden_layers", 12),
            n_head=_get(hf, "n_head", "num_attention_heads", 12),
            n_embd=_get(hf, "n_embd", "hidden_size", 768),
            dropout=0.0,
            bias=True,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_ACTIVATIONS[act],
            n_inner=hf.get("n_inner"),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        ),
        _HF_NAMES,
        where,
        "gpt2",
    )


def gpt_config_to_hf(c: GPTConfig) -> dict[str, Any]:
    """A transformers ``GPT2Config`` dict for our config."""
    if not c.bias:
        raise LmarchError("the GPT-2 layout has biases everywhere: it needs bias=True")
    if c.activation not in _ACTIVATIONS_TO_HF:
        raise LmarchError(f"the GPT-2 layout has no activation {c.activation!r}")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "activation_function": _ACTIVATIONS_TO_HF[c.activation],
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "scale_attn_weights": c.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": c.tie_embeddings,
    }


def load_hf_gpt2(folder: str | Path) -> GPT:
    """A GPT holding the weights of a Hugging Face GPT-2 folder."""
    config = gpt_config_from_hf(read_hf_config(folder), where=str(Path(folder) / "config.json"))
    tensors = gpt2_map(config).to_ours(read_hf_weights(folder), config.n_layer, where=str(folder))
    return build_from_weights(lambda: GPT(config), tensors, str(folder))


def save_hf_gpt2(model: GPT, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face GPT-2 folder that ``GPT2LMHeadModel`` loads."""
    c = model.config
    tensors = gpt2_map(c).to_theirs(unique_state_dict(model), c.n_layer)
    write_hf_folder(folder, gpt_config_to_hf(c), tensors)
