"""T5 / mT5 Hugging Face folders: every config field changes lmarch's model as it changes
transformers' (logits within 1e-4) or is refused by name; the output head's tying and rescaling
as transformers 5 reads them; folders lmarch writes load in transformers with the same logits
and read back into the same tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmarch.errors import LmarchError
from lmarch.models.registry import get_preset
from lmarch.models.t5 import T5, T5Config
from lmarch.weights.hf_t5 import T5_FIELDS, load_hf_t5, save_hf_t5, t5_config_from_hf

pytestmark = pytest.mark.usefixtures("one_thread")

OK = "loads"
BASE = dict(
    vocab_size=61, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
    decoder_start_token_id=0,
)  # fmt: skip
IDS = torch.tensor([[3, 17, 5, 29, 41, 8, 56, 12, 33], [7, 21, 9, 14, 2, 60, 0, 0, 0]])
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
DEC = torch.tensor([[0, 4, 19, 33, 2, 50], [0, 11, 11, 40, 6, 3]])

# (case id, transformers config overrides, config.json edits after saving, expected outcome:
# OK or a field name the refusal must contain)
CASES = [
    ("plain", {}, {}, OK),
    ("ffn_gelu", {"feed_forward_proj": "gelu"}, {}, OK),
    ("ffn_gated_gelu", {"feed_forward_proj": "gated-gelu"}, {}, OK),
    ("ffn_gated_silu", {"feed_forward_proj": "gated-silu"}, {}, OK),
    ("ffn_gated_relu", {"feed_forward_proj": "gated-relu"}, {}, OK),
    ("ffn_gated_exact_gelu", {"feed_forward_proj": "gated-gelu_python"}, {}, OK),
    ("ffn_quick_gelu", {"feed_forward_proj": "quick_gelu"}, {}, "feed_forward_proj"),
    ("no_rescaling_t5_4_style", {}, {"tie_word_embeddings": False}, OK),
    ("no_rescaling", {}, {"scale_decoder_outputs": False}, OK),
    ("more_decoder_layers", {"num_decoder_layers": 3}, {}, OK),
    ("d_kv_not_d_model_over_heads", {"d_kv": 12}, {}, OK),
    ("buckets", {"relative_attention_num_buckets": 16, "relative_attention_max_distance": 9}, {}, OK),
    ("layer_norm_epsilon", {"layer_norm_epsilon": 1e-2}, {}, OK),
    ("dropouts", {"dropout_rate": 0.3, "classifier_dropout": 0.2}, {}, OK),
    ("initializer_factor", {"initializer_factor": 0.5}, {}, OK),
    ("legacy_n_positions", {}, {"n_positions": 64}, OK),
    ("token_ids", {"pad_token_id": 2, "eos_token_id": 3, "decoder_start_token_id": 2}, {}, OK),
    ("not_encoder_decoder", {}, {"is_encoder_decoder": False}, "is_encoder_decoder"),
    ("quantization_config", {}, {"quantization_config": {"quant_method": "gptq"}}, "quant"),
    ("auto_map", {}, {"auto_map": {"AutoModel": "x.Y"}}, "auto_map"),
    ("num_layers=0", {}, {"num_layers": 0}, "num_layers"),
    ("buckets_too_few", {}, {"relative_attention_num_buckets": 2}, "relative_attention"),
    ("model_type", {}, {"model_type": "bart"}, "model_type"),
]  # fmt: skip


def _hf_folder(folder: Path, over: dict[str, Any], edits: dict[str, Any], mt5: bool = False):
    torch.manual_seed(0)
    cls, cfg_cls = (
        (transformers.MT5ForConditionalGeneration, transformers.MT5Config)
        if mt5
        else (transformers.T5ForConditionalGeneration, transformers.T5Config)
    )
    model = cls(cfg_cls(**{**BASE, **over})).eval()
    model.save_pretrained(folder)
    if edits:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.update(edits)
        path.write_text(json.dumps(config))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, T5):
            return model(IDS, MASK, DEC)
        return model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DEC).logits


@pytest.mark.parametrize(("case", "over", "edits", "expect"), CASES, ids=[c[0] for c in CASES])
def test_config_field(case: str, over: dict, edits: dict, expect: str, tmp_path: Path) -> None:
    theirs = _hf_folder(tmp_path, over, edits)
    if expect != OK:
        with pytest.raises(LmarchError, match=expect):
            load_hf_t5(tmp_path)
        return
    ours = load_hf_t5(tmp_path).eval()
    # what transformers itself makes of the (possibly edited) folder
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= 1e-4


def test_every_field_of_transformers_t5_config_is_classified() -> None:
    """Each key transformers writes to a T5 or mT5 config.json is implemented, inert or refused
    (anything else would be read by nobody)."""
    known = set(T5_FIELDS.implemented) | set(T5_FIELDS.inert) | set(T5_FIELDS.all_refused())
    for cfg in (transformers.T5Config(), transformers.MT5Config()):
        missing = sorted(set(cfg.to_dict()) - known)
        assert missing == [], missing


def test_head_tying_and_rescaling_as_transformers_reads_them(tmp_path: Path) -> None:
    """A head of its own in the file is untied; an old checkpoint that stores the embedding
    three times and the head as a copy of it loads tied; mT5 never rescales."""
    theirs = _hf_folder(tmp_path / "a", {"tie_word_embeddings": False}, {})
    sd = load_file(tmp_path / "a" / "model.safetensors")
    sd["lm_head.weight"] = torch.randn(61, 32)
    save_file(sd, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    ours = load_hf_t5(tmp_path / "a").eval()
    assert not ours.config.tie_embeddings and not ours.config.scale_output
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "a").eval()
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= 1e-4

    theirs = _hf_folder(tmp_path / "b", {}, {})
    sd = load_file(tmp_path / "b" / "model.safetensors")
    for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        sd[copy] = sd["shared.weight"].clone()
    save_file(sd, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    ours = load_hf_t5(tmp_path / "b").eval()
    assert ours.config.tie_embeddings and ours.config.scale_output
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= 1e-4

    theirs = _hf_folder(tmp_path / "c", {}, {}, mt5=True)
    ours = load_hf_t5(tmp_path / "c").eval()
    assert ours.config.variant == "mt5" and not ours.config.scale_output
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= 1e-4


SAVED = {
    "v1": T5Config(vocab_size=61, n_layer=2, n_decoder_layer=3, n_head=4, n_embd=32, head_dim=8,
                   intermediate_size=40, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, dropout=0.0),
    "v1_1": T5Config(vocab_size=61, n_layer=2, n_head=4, n_embd=32, head_dim=8,
                     intermediate_size=40, activation="gelu_tanh", gated_ffn=True,
                     tie_embeddings=False, scale_output=False, dropout=0.0),
    "mt5": T5Config(vocab_size=61, n_layer=2, n_head=4, n_embd=32, head_dim=8,
                    intermediate_size=40, activation="gelu_tanh", gated_ffn=True,
                    tie_embeddings=False, scale_output=False, dropout=0.0, variant="mt5"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SAVED))
def test_saved_folder_loads_in_transformers_and_back(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    ours = T5(SAVED[name]).eval()
    save_hf_t5(ours, tmp_path)
    cls = (
        transformers.MT5ForConditionalGeneration
        if name == "mt5"
        else transformers.T5ForConditionalGeneration
    )
    theirs = cls.from_pretrained(tmp_path).eval()
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= 1e-4
    back = load_hf_t5(tmp_path)
    assert back.config == ours.config
    mine, again = ours.state_dict(), back.state_dict()
    assert mine.keys() == again.keys()
    assert all(torch.equal(mine[k], again[k]) for k in mine)


def test_damaged_folders_are_refused_by_name(tmp_path: Path) -> None:
    _hf_folder(tmp_path, {}, {})
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight")
    sd["decoder.block.1.layer.2.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmarchError, match=r"DenseReluDense\.wo\.weight' is missing"):
        load_hf_t5(tmp_path)
    sd["decoder.block.1.layer.2.DenseReluDense.wo.weight"] = torch.zeros(32, 40)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        LmarchError, match=r"unexpected tensors \['decoder\.block\.1\.layer\.2\.extra"
    ):
        load_hf_t5(tmp_path)


def test_an_mt5_config_that_rescales_cannot_be_written(tmp_path: Path) -> None:
    config = T5Config(vocab_size=61, n_layer=1, n_head=2, n_embd=16, head_dim=8,
                      intermediate_size=16, variant="mt5")  # fmt: skip
    with pytest.raises(LmarchError, match="mT5 never rescales"):
        save_hf_t5(T5(config), tmp_path)


# the fields of the config.json files published with google's t5-small, t5-v1_1-small and
# mt5-small checkpoints (the weights are not available here; the shapes are)
PUBLISHED = {
    "t5-small": (
        {"d_ff": 2048, "d_kv": 64, "d_model": 512, "decoder_start_token_id": 0,
         "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
         "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
         "n_positions": 512, "num_heads": 8, "num_layers": 6, "output_past": True,
         "pad_token_id": 0, "relative_attention_num_buckets": 32, "vocab_size": 32128},
        False,
    ),
    "t5-v1_1-small": (
        {"d_ff": 1024, "d_kv": 64, "d_model": 512, "decoder_start_token_id": 0,
         "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
         "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06,
         "model_type": "t5", "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8,
         "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
         "tie_word_embeddings": False, "vocab_size": 32128},
        True,
    ),
    "mt5-small": (
        {"d_ff": 1024, "d_kv": 64, "d_model": 512, "decoder_start_token_id": 0,
         "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
         "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06,
         "model_type": "mt5", "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8,
         "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
         "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer", "vocab_size": 250112},
        True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_read_as_the_presets(name: str) -> None:
    hf, own_head = PUBLISHED[name]
    assert t5_config_from_hf(hf, name, untied_head=own_head) == get_preset(name).config


def _unigram_tokenizer_json(folder: Path) -> Any:
    """A T5-style Unigram tokenizer.json (T5's special ids 0-2, Metaspace pre-tokenizer), made
    with the ``tokenizers`` library, which is also the oracle for its ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["▁to", "▁be", "▁or", "▁not", "▁that", "▁is", "▁the", "▁question", "▁", "t", "o"]
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(w, -1.0 - i / 10) for i, w in enumerate(words)]
    vocab += [(c, -8.0) for c in letters if c not in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_lmarch_load_reads_a_t5_folder_with_its_unigram_tokenizer(tmp_path: Path) -> None:
    from lmarch.loading import load

    theirs = _hf_folder(tmp_path, {}, {})
    oracle = _unigram_tokenizer_json(tmp_path)
    loaded = load(tmp_path)
    assert (loaded.family, loaded.objective) == ("t5", "seq2seq")
    assert (_logits(loaded.model) - _logits(theirs)).abs().max().item() <= 1e-4
    text = "to be or not to be that is the question"
    assert loaded.tokenizer.encode(text) == oracle.encode(text).ids
    with pytest.raises(LmarchError, match=r"holds seq2seq \(t5\); generate needs a causal LM"):
        loaded.require("causal-lm", "generate")
