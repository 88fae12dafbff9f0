"""GPT-2 in the Hugging Face layout (``GPT2LMHeadModel``): names, config and folders.

Their attention and MLP projections are ``Conv1D`` modules storing W as [in, out] (x @ W), while
ours are ``nn.Linear`` storing [out, in]; those matrices are transposed on the way across. Their
fused ``c_attn`` has the same row order as our ``qkv`` (all of Q, then K, then V).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.weights.hf import read_hf_config, read_hf_weights, write_hf_folder
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import load_into_model, unique_state_dict

_T, _H = "transformer.", "transformer.h.{i}."

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
    ignore=[r"^lm_head\.weight$", r"\.attn\.(masked_)?bias$"],
)

_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def gpt_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our GPTConfig from a transformers ``GPT2Config`` dict."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise LmarchError(f"unsupported GPT-2 activation {act!r}")
    n_embd = hf["n_embd"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[act],
        n_inner=hf.get("n_inner"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def gpt_config_to_hf(c: GPTConfig) -> dict[str, Any]:
    """A transformers ``GPT2Config`` dict for our config."""
    if not c.bias or not c.tie_embeddings:
        raise LmarchError("the GPT-2 layout needs bias=True and tie_embeddings=True")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "activation_function": act,
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "tie_word_embeddings": True,
    }


def load_hf_gpt2(folder: str | Path) -> GPT:
    """A GPT holding the weights of a Hugging Face GPT-2 folder."""
    config = gpt_config_from_hf(read_hf_config(folder))
    model = GPT(config)
    tensors = GPT2_MAP.to_ours(read_hf_weights(folder), config.n_layer, where=str(folder))
    load_into_model(model, tensors, source=str(folder))
    return model


def save_hf_gpt2(model: GPT, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face GPT-2 folder that ``GPT2LMHeadModel`` loads."""
    tensors = GPT2_MAP.to_theirs(unique_state_dict(model), model.config.n_layer)
    write_hf_folder(folder, gpt_config_to_hf(model.config), tensors)
