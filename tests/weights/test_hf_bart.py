"""BART and Marian folders in the Hugging Face layout: every config field changes lmarch's model
as it changes transformers' or is refused by name; folders load, save back (transformers
reads what lmarch writes) and refuse what they cannot hold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmarch.errors import LmarchError
from lmarch.models.bart import Bart, BartConfig
from lmarch.weights.hf_bart import (
    BART_FIELDS,
    MARIAN_FIELDS,
    bart_config_from_hf,
    load_hf_bart,
    save_hf_bart,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OK = "loads"
SHAPE = dict(
    d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
    decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=32,
)  # fmt: skip
BART_BASE = dict(vocab_size=61, **SHAPE)
MARIAN_BASE = dict(
    vocab_size=61, pad_token_id=60, decoder_start_token_id=60, eos_token_id=0,
    forced_eos_token_id=0, scale_embedding=True, **SHAPE,
)  # fmt: skip
SRC = torch.tensor([[5, 17, 9, 29, 41, 8, 33, 12], [7, 21, 3, 44, 60, 60, 60, 60]])
MASK = (torch.arange(8)[None] < torch.tensor([[8], [4]])).long()
DEC = torch.tensor([[2, 11, 4, 30, 19, 6], [2, 35, 10, 3, 27, 49]])

# (case id, transformers config overrides, config.json edits after saving, expected: OK or a
# text the refusal must contain)
BART_CASES = [
    ("plain", {}, {}, OK),
    ("scale_embedding", {"scale_embedding": True}, {}, OK),
    ("untied", {"tie_word_embeddings": False}, {}, OK),
    ("act_relu", {"activation_function": "relu"}, {}, OK),
    ("act_silu", {"activation_function": "silu"}, {}, OK),
    ("act_gelu_new", {"activation_function": "gelu_new"}, {}, OK),
    ("act_tanh", {"activation_function": "tanh"}, {}, OK),
    ("act_quick_gelu", {"activation_function": "quick_gelu"}, {}, "activation_function"),
    ("dropouts", {"dropout": 0.3, "attention_dropout": 0.2, "activation_dropout": 0.1}, {}, OK),
    ("layerdrop", {"encoder_layerdrop": 0.5, "decoder_layerdrop": 0.5}, {}, OK),
    # keys of transformers 4's BartConfig that transformers 5 no longer reads
    ("legacy_keys", {}, {"normalize_before": False, "add_final_layer_norm": False,
                         "static_position_embeddings": False, "extra_pos_embeddings": 2}, OK),
    ("generation_keys", {}, {"forced_bos_token_id": 0, "no_repeat_ngram_size": 3,
                             "num_beams": 4}, OK),
    ("is_decoder", {}, {"is_decoder": True}, "is_decoder"),
    ("not_encoder_decoder", {}, {"is_encoder_decoder": False}, "is_encoder_decoder"),
    ("mbart", {}, {"model_type": "mbart"}, "model_type='mbart'"),
    ("no_pad", {}, {"pad_token_id": None}, "pad_token_id"),
    ("two_eos", {}, {"generation": {"eos_token_id": [2, 3]}}, "eos_token_id"),
    ("one_eos_in_a_list", {}, {"generation": {"eos_token_id": [2]}}, OK),
    ("heads_not_dividing", {}, {"encoder_attention_heads": 3}, "d_model"),
    ("decoder_layers_0", {}, {"decoder_layers": 0}, "decoder_layers"),
    ("quantization_config", {}, {"quantization_config": {"quant_method": "gptq"}}, "quant"),
    ("auto_map", {}, {"auto_map": {"AutoModel": "x.Y"}}, "auto_map"),
]  # fmt: skip
MARIAN_CASES = [
    ("plain", {}, {}, OK),
    ("swish", {"activation_function": "swish"}, {}, OK),
    ("unscaled", {"scale_embedding": False}, {}, OK),
    ("untied", {"tie_word_embeddings": False}, {}, OK),
    ("two_vocabs", {"share_encoder_decoder_embeddings": False, "decoder_vocab_size": 57,
                    "pad_token_id": 56, "decoder_start_token_id": 56}, {}, OK),
    ("two_vocabs_untied", {"share_encoder_decoder_embeddings": False, "decoder_vocab_size": 57,
                           "pad_token_id": 56, "decoder_start_token_id": 56,
                           "tie_word_embeddings": False}, {}, OK),
    ("pad_beyond_target_vocab", {}, {"share_encoder_decoder_embeddings": False,
                                     "decoder_vocab_size": 40}, "pad_token_id"),
    ("is_decoder", {}, {"is_decoder": True}, "is_decoder"),
]  # fmt: skip


def _hf_model(family: str, fields: dict[str, Any]) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "bart":
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(**fields))
    else:
        model = transformers.MarianMTModel(transformers.MarianConfig(**fields))
    with torch.no_grad():  # norm gains start at 1, biases at 0: perturb what can be trained
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        model.final_logits_bias.normal_()
    return model.eval()


def _edit(folder: Path, edits: dict[str, Any]) -> None:
    """Set keys of config.json (those under ``"generation"``: of generation_config.json)."""
    edits = dict(edits)
    generation = edits.pop("generation", {})
    for name, changes in (("config.json", edits), ("generation_config.json", generation)):
        path = folder / name
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))


def _run(model: torch.nn.Module, dec: torch.Tensor = DEC) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, Bart):
            return model(SRC, MASK, dec)
        return model(input_ids=SRC, attention_mask=MASK, decoder_input_ids=dec).logits


def _grid(family: str, tmp_path: Path, overrides: dict, edits: dict, expected: str) -> None:
    base = BART_BASE if family == "bart" else MARIAN_BASE
    hf = _hf_model(family, {**base, **overrides})
    hf.save_pretrained(tmp_path)
    _edit(tmp_path, edits)
    if expected == OK:
        dec = DEC.clamp(max=hf.config.decoder_vocab_size - 1) if family == "marian" else DEC
        err = (_run(load_hf_bart(tmp_path).eval(), dec) - _run(hf, dec)).abs().max().item()
        assert err <= 1e-4, f"max abs error {err}"
        return
    with pytest.raises(LmarchError) as info:
        load_hf_bart(tmp_path)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("name", "overrides", "edits", "expected"), BART_CASES, ids=[c[0] for c in BART_CASES]
)
def test_bart_config_field(tmp_path: Path, name: str, overrides: dict, edits: dict, expected: str) -> None:  # fmt: skip
    _grid("bart", tmp_path, overrides, edits, expected)


@pytest.mark.parametrize(
    ("name", "overrides", "edits", "expected"), MARIAN_CASES, ids=[c[0] for c in MARIAN_CASES]
)
def test_marian_config_field(tmp_path: Path, name: str, overrides: dict, edits: dict, expected: str) -> None:  # fmt: skip
    _grid("marian", tmp_path, overrides, edits, expected)


@pytest.mark.parametrize(
    ("fields", "config_cls"),
    [(BART_FIELDS, transformers.BartConfig), (MARIAN_FIELDS, transformers.MarianConfig)],
    ids=["bart", "marian"],
)
def test_every_transformers_field_is_classified(fields: Any, config_cls: type) -> None:
    """Each key transformers writes for the family is implemented, inert or refused, and no
    key sits in two of those lists."""
    keys = set(config_cls().to_dict())
    implemented, inert, refused = (
        set(fields.implemented),
        set(fields.inert),
        set(fields.all_refused()),
    )
    assert keys - (implemented | inert | refused) == set()
    assert not (implemented & inert or implemented & refused or inert & refused)


def test_generation_ids_come_from_generation_config_json(tmp_path: Path) -> None:
    """transformers 5 keeps forced_bos_token_id in generation_config.json; an older
    config.json may hold it itself. The generation file wins where both say."""
    hf = _hf_model("bart", BART_BASE)
    hf.save_pretrained(tmp_path)
    assert load_hf_bart(tmp_path).config.forced_bos_token_id is None
    _edit(tmp_path, {"forced_bos_token_id": 5})
    assert load_hf_bart(tmp_path).config.forced_bos_token_id == 5
    hf.generation_config.forced_bos_token_id = 0
    hf.generation_config.decoder_start_token_id = 7
    hf.generation_config.save_pretrained(tmp_path)
    config = load_hf_bart(tmp_path).config
    assert (config.forced_bos_token_id, config.decoder_start_token_id) == (0, 7)


# ---- saving back ---------------------------------------------------------------------------------

_OURS = dict(
    vocab_size=61, block_size=32, n_encoder_layer=2, n_decoder_layer=1, n_head=4,
    n_decoder_head=2, n_embd=32, intermediate_size=48, decoder_intermediate_size=40,
)  # fmt: skip
_MARIAN = dict(
    variant="marian", pad_token_id=60, decoder_start_token_id=60, eos_token_id=0,
    forced_eos_token_id=0, bos_token_id=None, scale_embedding=True, activation="silu",
)  # fmt: skip
SAVE_CASES = {
    "bart": {},
    "bart_shared_untied_head": {"tie_embeddings": False},
    "bart_all_untied": {"share_embeddings": False, "tie_embeddings": False},
    "marian": _MARIAN,
    "marian_two_vocabs": {
        **_MARIAN, "share_embeddings": False, "target_vocab_size": 57, "pad_token_id": 56,
        "decoder_start_token_id": 56,
    },
    "marian_shared_untied_head": {**_MARIAN, "tie_embeddings": False},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SAVE_CASES))
def test_saved_folder_loads_in_transformers_and_back(tmp_path: Path, name: str) -> None:
    """What save_hf_bart writes, transformers' from_pretrained reads with no missing weight
    and gives the same logits; reading it back gives the same model."""
    torch.manual_seed(0)
    ours = Bart(BartConfig(**{**_OURS, **SAVE_CASES[name]})).eval()
    with torch.no_grad():
        ours.logits_bias.normal_()
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_hf_bart(ours, tmp_path)
    cls = transformers.BartForConditionalGeneration
    if ours.config.variant == "marian":
        cls = transformers.MarianMTModel
    theirs, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    dec = DEC.clamp(max=ours.config.decoder_vocab_size - 1)
    assert (_run(theirs.eval(), dec) - _run(ours, dec)).abs().max().item() <= 1e-4
    again = load_hf_bart(tmp_path).eval()
    if ours.config.share_embeddings and not ours.config.tie_embeddings:
        # transformers 5 unties every table with the head: the shared one comes back as two
        # equal tables, the same model
        assert again.config == dataclasses.replace(ours.config, share_embeddings=False)
        assert torch.equal(again.tok_emb.weight, again.tgt_emb.weight)
        assert torch.equal(_run(again, dec), _run(ours, dec))
        return
    assert again.config == ours.config
    mine, back = ours.state_dict(), again.state_dict()
    assert mine.keys() == back.keys() and all(torch.equal(mine[k], back[k]) for k in mine)


def test_separate_tables_with_a_tied_head_have_no_bart_form(tmp_path: Path) -> None:
    model = Bart(BartConfig(**_OURS, share_embeddings=False))
    with pytest.raises(LmarchError, match="separate source and target tables"):
        save_hf_bart(model, tmp_path)


# ---- older and damaged folders -------------------------------------------------------------------


def _rewrite(folder: Path, change: Any) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_aliases_of_tied_tables_in_older_files(tmp_path: Path) -> None:
    """A file holding the shared table only as the encoder's (or as every alias) loads the
    same model."""
    hf = _hf_model("bart", BART_BASE)
    hf.save_pretrained(tmp_path)
    reference = _run(hf)

    def only_encoder(t: dict) -> None:
        t["model.encoder.embed_tokens.weight"] = t.pop("model.shared.weight")

    _rewrite(tmp_path, only_encoder)
    assert (_run(load_hf_bart(tmp_path).eval()) - reference).abs().max().item() <= 1e-4

    def every_alias(t: dict) -> None:
        table = t["model.encoder.embed_tokens.weight"]
        t.update({"model.shared.weight": table.clone(), "lm_head.weight": table.clone()})
        t["model.decoder.embed_tokens.weight"] = table.clone()

    _rewrite(tmp_path, every_alias)
    assert (_run(load_hf_bart(tmp_path).eval()) - reference).abs().max().item() <= 1e-4


def test_marian_position_tables_are_checked(tmp_path: Path) -> None:
    """Older Marian files store their sinusoid tables: the right ones load, others are refused."""
    hf = _hf_model("marian", MARIAN_BASE)
    hf.save_pretrained(tmp_path)
    table = hf.model.encoder.embed_positions.weight.detach().clone()
    _rewrite(tmp_path, lambda t: t.update({"model.encoder.embed_positions.weight": table}))
    assert (_run(load_hf_bart(tmp_path).eval()) - _run(hf)).abs().max().item() <= 1e-4
    _rewrite(tmp_path, lambda t: t.update({"model.decoder.embed_positions.weight": table + 0.1}))
    with pytest.raises(LmarchError, match="decoder.embed_positions.weight is not Marian's"):
        load_hf_bart(tmp_path)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"encoder_layers": 1 << 20}, "tensor 'model.encoder.layers.2.self_attn.q_proj.weight' is missing"),
        ({"d_model": 1 << 20, "encoder_attention_heads": 1, "decoder_attention_heads": 1}, "model expects"),
        ({"encoder_ffn_dim": 1 << 30}, "tensor encoder.blocks.0.ffn.fc_in.weight has shape (48, 32)"),
    ],
    ids=["layers", "width", "ffn"],
)  # fmt: skip
def test_a_config_that_contradicts_its_weights_is_refused_before_allocating(
    tmp_path: Path, edits: dict, message: str
) -> None:
    hf = _hf_model("bart", BART_BASE)
    hf.save_pretrained(tmp_path)
    _edit(tmp_path, edits)
    with pytest.raises(LmarchError) as info:
        load_hf_bart(tmp_path)
    assert message in str(info.value)


def test_unexpected_tensor_is_refused(tmp_path: Path) -> None:
    hf = _hf_model("bart", BART_BASE)
    hf.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.encoder.layernorm_final.weight": torch.ones(32)}))
    with pytest.raises(LmarchError, match="unexpected tensors"):
        load_hf_bart(tmp_path)


def test_config_from_hf_takes_transformers_defaults() -> None:
    """Fields a config.json leaves out take transformers' defaults (BART-large / opus-mt)."""
    bart = bart_config_from_hf({"model_type": "bart"})
    assert (bart.n_embd, bart.vocab_size, bart.pad_token_id, bart.forced_eos_token_id) == (
        1024, 50265, 1, 2,
    )  # fmt: skip
    marian = bart_config_from_hf({"model_type": "marian"})
    assert (marian.variant, marian.pad_token_id, marian.eos_token_id) == ("marian", 58100, 0)
    assert dataclasses.asdict(marian)["decoder_start_token_id"] == 58100
