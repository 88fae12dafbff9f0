"""Every field of a supported Hugging Face config either changes lmarch's model as it changes
transformers' or is refused by name.

Each case builds a random-initialised tiny ``transformers`` model from a config with one or a
few fields changed, saves it with ``save_pretrained`` (some cases then edit the saved
config.json by hand, for fields transformers does not take as arguments), loads the folder with
lmarch's loader, and checks the outcome the case states: equal outputs (fp32, max abs error
<= 1e-4) or an :class:`LmarchError` whose message names the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lmarch.errors import LmarchError
from lmarch.weights.hf_bert import BERT_FIELDS, load_hf_bert
from lmarch.weights.hf_gpt2 import GPT2_FIELDS, load_hf_gpt2
from lmarch.weights.hf_llama import LLAMA_FIELDS, load_hf_llama

torch.set_num_threads(1)  # tiny models: threads cost more than they give

OK = "loads"
IDS = torch.tensor([[3, 17, 5, 29, 41, 8, 0, 56, 12, 33, 7, 21]])  # 12 tokens, all < 61

GPT2_BASE = dict(vocab_size=61, n_positions=32, n_embd=32, n_layer=3, n_head=4)
LLAMA_BASE = dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
)  # fmt: skip
BERT_BASE = dict(
    vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=48, max_position_embeddings=40,
)  # fmt: skip


def _yarn(**extra: Any) -> dict[str, Any]:
    return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, **extra}


# (case id, transformers config overrides, config.json edits after saving, expected outcome:
# OK or a field name the refusal must contain)
GPT2_CASES = [
    ("plain", {}, {}, OK),
    ("scale_attn_weights=False", {"scale_attn_weights": False}, {}, OK),
    ("scale_by_inverse_layer_idx", {"scale_attn_by_inverse_layer_idx": True}, {}, OK),
    (
        "both_scalings",
        {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True},
        {},
        OK,
    ),
    ("untied_head", {"tie_word_embeddings": False}, {}, OK),
    ("n_inner", {"n_inner": 40}, {}, OK),
    ("layer_norm_epsilon", {"layer_norm_epsilon": 1e-2}, {}, OK),
    ("act_gelu", {"activation_function": "gelu"}, {}, OK),
    ("act_relu", {"activation_function": "relu"}, {}, OK),
    ("act_silu", {"activation_function": "silu"}, {}, OK),
    ("act_tanh", {"activation_function": "tanh"}, {}, OK),
    ("act_gelu_pytorch_tanh", {"activation_function": "gelu_pytorch_tanh"}, {}, OK),
    ("act_quick_gelu", {"activation_function": "quick_gelu"}, {}, "activation_function"),
    ("reorder_and_upcast_attn", {"reorder_and_upcast_attn": True}, {}, OK),
    ("dropouts", {"resid_pdrop": 0.3, "embd_pdrop": 0.2, "attn_pdrop": 0.4}, {}, OK),
    ("summary_head_fields", {"summary_type": "mean", "summary_use_proj": False}, {}, OK),
    ("token_ids", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, {}, OK),
    ("legacy_n_ctx", {}, {"n_ctx": 32}, OK),
    ("add_cross_attention", {"add_cross_attention": True}, {}, "add_cross_attention"),
    ("is_causal", {}, {"is_causal": False}, "is_causal"),
    ("sliding_window", {}, {"sliding_window": 4}, "sliding_window"),
    ("quantization_config", {}, {"quantization_config": {"quant_method": "gptq"}}, "quant"),
    ("auto_map", {}, {"auto_map": {"AutoModel": "x.Y"}}, "auto_map"),
    ("n_layer=0", {}, {"n_layer": 0}, "n_layer"),
    ("n_head_not_dividing", {}, {"n_head": 3}, "n_embd"),
]

LLAMA_CASES = [
    ("plain", {}, {}, OK),
    ("attention_bias", {"attention_bias": True}, {}, OK),
    ("mlp_bias", {"mlp_bias": True}, {}, OK),
    ("both_biases_tied", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}, {}, OK),
    ("mqa", {"num_key_value_heads": 1}, {}, OK),
    ("mha", {"num_key_value_heads": 4}, {}, OK),
    ("head_dim_16", {"head_dim": 16}, {}, OK),
    ("rms_norm_eps", {"rms_norm_eps": 1e-2}, {}, OK),
    ("act_gelu", {"hidden_act": "gelu"}, {}, OK),
    ("act_gelu_pytorch_tanh", {"hidden_act": "gelu_pytorch_tanh"}, {}, OK),
    ("act_relu", {"hidden_act": "relu"}, {}, OK),
    ("act_quick_gelu", {"hidden_act": "quick_gelu"}, {}, "hidden_act"),
    ("rope_theta", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, {}, OK),
    ("rope_linear", {"rope_parameters": {"rope_type": "linear", "factor": 3.0}}, {}, OK),
    # the 12-token input is longer than max_position_embeddings: the base grows
    ("rope_dynamic", {"max_position_embeddings": 8, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, {}, OK),
    ("rope_dynamic_short", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, {}, OK),
    ("rope_yarn", {"rope_parameters": _yarn()}, {}, OK),
    ("rope_yarn_betas", {"rope_parameters": _yarn(beta_fast=16.0, beta_slow=2.0)}, {}, OK),
    ("rope_yarn_attention_factor", {"rope_parameters": _yarn(attention_factor=1.5)}, {}, OK),
    ("rope_yarn_mscales", {"rope_parameters": _yarn(mscale=1.0, mscale_all_dim=0.5)}, {}, OK),
    ("rope_yarn_no_truncate", {"rope_parameters": _yarn(truncate=False)}, {}, OK),
    (
        "rope_llama3",
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8}},
        {},
        OK,
    ),  # fmt: skip
    (
        "rope_v4_keys",  # transformers 4's rope_theta + rope_scaling, as older folders hold them
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 300.0}},
        {"rope_parameters": None, "rope_theta": 300.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
        OK,
    ),
    (
        "rope_longrope",
        {},
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                             "long_factor": [2.0] * 4, "original_max_position_embeddings": 8}},
        "rope_type",
    ),  # fmt: skip
    ("rope_yarn_bad_factor", {}, {"rope_parameters": _yarn(factor="x", rope_theta=1e4)}, "factor"),
    ("pretraining_tp", {"pretraining_tp": 2}, {}, OK),
    ("attention_dropout", {"attention_dropout": 0.3}, {}, OK),
    ("partial_rotary_factor", {}, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("is_causal", {}, {"is_causal": False}, "is_causal"),
    ("sliding_window", {}, {"sliding_window": 4}, "sliding_window"),
    ("quantization_config", {}, {"quantization_config": {"quant_method": "awq"}}, "quant"),
    ("num_hidden_layers=-1", {}, {"num_hidden_layers": -1}, "num_hidden_layers"),
    ("kv_heads_not_dividing", {}, {"num_key_value_heads": 3}, "num_attention_heads"),
]  # fmt: skip

BERT_CASES = [
    ("bert", {}, {}, OK),
    ("bert_act_gelu_new", {"hidden_act": "gelu_new"}, {}, OK),
    ("bert_act_relu", {"hidden_act": "relu"}, {}, OK),
    ("bert_layer_norm_eps", {"layer_norm_eps": 1e-3}, {}, OK),
    ("bert_type_vocab", {"type_vocab_size": 4}, {}, OK),
    ("bert_dropouts", {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.2}, {}, OK),
    ("bert_is_decoder", {"is_decoder": True}, {}, "is_decoder"),
    ("bert_cross_attention", {"is_decoder": True, "add_cross_attention": True}, {}, "add_cross_attention"),
    ("bert_chunked_ffn", {"chunk_size_feed_forward": 3}, {}, OK),
    ("bert_token_ids", {"pad_token_id": 2, "bos_token_id": 3, "eos_token_id": 4}, {}, OK),
    ("bert_relative_positions", {}, {"position_embedding_type": "relative_key"}, "position_embedding"),
    ("roberta", {"pad_token_id": 1, "type_vocab_size": 1, "max_position_embeddings": 42}, {}, OK),
    ("roberta_pad_3", {"pad_token_id": 3, "max_position_embeddings": 44}, {}, OK),
    ("albert", {"embedding_size": 16}, {}, OK),
    ("albert_groups", {"embedding_size": 16, "num_hidden_layers": 4, "num_hidden_groups": 2}, {}, OK),
    ("albert_inner_groups", {"inner_group_num": 2}, {}, "inner_group_num"),
    ("electra", {"embedding_size": 16}, {}, OK),
    ("electra_same_width", {"embedding_size": 32}, {}, OK),
]  # fmt: skip
_BERT_CLASSES = {
    "bert": (transformers.BertConfig, transformers.BertModel),
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
    "albert": (transformers.AlbertConfig, transformers.AlbertModel),
    "electra": (transformers.ElectraConfig, transformers.ElectraModel),
}


def _save(model: torch.nn.Module, folder: Path, edits: dict[str, Any]) -> None:
    with torch.no_grad():  # norm gains start at 1 and biases at 0: perturb them all
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    if edits:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        for key, value in edits.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))


def _check(load: Any, folder: Path, expected: str, reference: torch.Tensor, run: Any) -> None:
    if expected == OK:
        ours = load(folder).eval()
        with torch.no_grad():
            err = (run(ours) - reference).abs().max().item()
        assert err <= 1e-4, f"max abs error {err}"
        return
    with pytest.raises(LmarchError) as info:
        load(folder)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("name", "overrides", "edits", "expected"), GPT2_CASES, ids=[c[0] for c in GPT2_CASES]
)
def test_gpt2_config_field(tmp_path: Path, name: str, overrides: dict, edits: dict, expected: str) -> None:  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_BASE, **overrides})).eval()
    _save(hf, tmp_path, edits)
    with torch.no_grad():
        reference = hf(IDS).logits
    _check(load_hf_gpt2, tmp_path, expected, reference, lambda m: m(IDS))


@pytest.mark.parametrize(
    ("name", "overrides", "edits", "expected"), LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES]
)
def test_llama_config_field(tmp_path: Path, name: str, overrides: dict, edits: dict, expected: str) -> None:  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_BASE, **overrides}))
    hf.eval()
    _save(hf, tmp_path, edits)
    with torch.no_grad():
        reference = hf(IDS).logits
    _check(load_hf_llama, tmp_path, expected, reference, lambda m: m(IDS))


@pytest.mark.parametrize(
    ("name", "overrides", "edits", "expected"), BERT_CASES, ids=[c[0] for c in BERT_CASES]
)
def test_bert_family_config_field(tmp_path: Path, name: str, overrides: dict, edits: dict, expected: str) -> None:  # fmt: skip
    config_cls, model_cls = _BERT_CLASSES[name.split("_")[0]]
    torch.manual_seed(0)
    no_pooler = {} if model_cls is transformers.ElectraModel else {"add_pooling_layer": False}
    hf = model_cls(config_cls(**{**BERT_BASE, **overrides}), **no_pooler).eval()
    _save(hf, tmp_path, edits)
    ids = IDS.clamp(min=4)  # no pad ids: RoBERTa's positions then count every token
    with torch.no_grad():
        reference = hf(ids).last_hidden_state
    _check(lambda f: load_hf_bert(f, task="base"), tmp_path, expected, reference, lambda m: m(ids))


@pytest.mark.parametrize(
    "model_cls",
    [transformers.BertForMaskedLM, transformers.AlbertForMaskedLM, transformers.ElectraForMaskedLM],
)
def test_untied_masked_lm_head_is_refused(tmp_path: Path, model_cls: type) -> None:
    """Our masked-LM decoder is the word embeddings; a folder whose decoder is its own matrix
    (tie_word_embeddings=False) is refused rather than loaded with the wrong one."""
    config_cls = model_cls.config_class
    extra = {} if config_cls is transformers.BertConfig else {"embedding_size": 16}
    hf = model_cls(config_cls(**BERT_BASE, **extra, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path)
    with pytest.raises(LmarchError, match="tie_word_embeddings=False"):
        load_hf_bert(tmp_path)


@pytest.mark.parametrize(
    ("fields", "config_cls"),
    [
        (GPT2_FIELDS, transformers.GPT2Config),
        (LLAMA_FIELDS, transformers.LlamaConfig),
        *((BERT_FIELDS, c) for c, _ in _BERT_CLASSES.values()),
    ],
    ids=["gpt2", "llama", *_BERT_CLASSES],
)
def test_every_transformers_field_is_classified(fields: Any, config_cls: type) -> None:
    """Each key transformers writes for the family is implemented, inert or refused, and no key
    sits in two of those lists: a field added by a newer transformers fails here first."""
    keys = set(config_cls().to_dict())
    implemented, inert, refused = (
        set(fields.implemented),
        set(fields.inert),
        set(fields.all_refused()),
    )
    assert keys - (implemented | inert | refused) == set()
    assert (
        implemented & inert == set() and implemented & refused == set() and inert & refused == set()
    )


def _tiny_folder(tmp_path: Path, family: str) -> Path:
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_BASE))
    elif family == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**BERT_BASE))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_BASE))
    model.save_pretrained(tmp_path)
    return tmp_path


# (family, config.json edits, the refusal's message after "<folder>")
BAD_FOLDERS = [
    ("gpt2", {"n_embd": 1 << 20, "n_head": 1}, ": tensor tok_emb.weight has shape (61, 32), model expects (61, 1048576)"),
    ("gpt2", {"n_layer": 1 << 20}, ": tensor 'transformer.h.3.ln_1.weight' is missing"),
    ("gpt2", {"n_layer": "3"}, "/config.json: gpt2 config field n_layer: GPTConfig.n_layer must be an integer >= 1, got '3'"),
    ("llama", {"max_position_embeddings": 1 << 40}, "/config.json: llama config field max_position_embeddings: LlamaConfig.block_size must be at most 16777216 (the rotary tables hold every position), got 1099511627776"),
    ("llama", {"intermediate_size": 1 << 30}, ": tensor blocks.0.ffn.gate_up.weight has shape (96, 32), model expects (2147483648, 32)"),
    ("llama", {"rope_parameters": "linear"}, "/config.json: llama config field rope_scaling='linear' is not supported (hint: lmarch implements a dict (or null))"),
    ("bert", {"hidden_size": 1 << 20, "num_attention_heads": 1}, ": tensor bert.tok_emb.weight has shape (61, 32), model expects (61, 1048576)"),
    ("bert", {"intermediate_size": 1 << 30}, ": tensor bert.blocks.0.ffn.fc_in.weight has shape (48, 32), model expects (1073741824, 32)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("family", "edits", "message"), BAD_FOLDERS, ids=[str(e) for _, e, _ in BAD_FOLDERS]
)
def test_a_config_that_contradicts_its_weights_is_refused_before_allocating(
    tmp_path: Path, family: str, edits: dict, message: str
) -> None:  # fmt: skip
    """Sizes are checked against the tensors before the model is built: a config claiming a
    million-wide embedding or a 2**40 context is one error, not a gigantic allocation."""
    folder = _tiny_folder(tmp_path, family)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edits}))
    load = {"gpt2": load_hf_gpt2, "llama": load_hf_llama, "bert": load_hf_bert}[family]
    with pytest.raises(LmarchError) as info:
        load(folder)
    assert str(info.value) == f"{folder}{message}"


def test_config_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path, "gpt2")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(LmarchError, match=r"config\.json holds a JSON list, not an object"):
        load_hf_gpt2(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folder_loads_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    """A folder saved in half precision gives float32 parameters holding the same values (the
    logits of transformers' model with those rounded weights, computed in float32)."""
    folder = _tiny_folder(tmp_path, "llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).to(dtype)
    hf.save_pretrained(folder)
    ours = load_hf_llama(folder).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    with torch.no_grad():
        reference = hf.float().eval()(IDS).logits
        assert (ours(IDS) - reference).abs().max().item() <= 1e-4
