"""The preset registry: typed presets that build and train, and real-weight presets that say
what their files say."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.models.registry import FAMILIES, PRESETS, get_preset, preset_config
from lmarch.tokenizers.kinds import TOKENIZER_KINDS
from lmarch.train.config import TrainConfig
from lmarch.train.run import train_run
from lmarch.train.trainer import Callback

pytestmark = pytest.mark.usefixtures("one_thread")

# Full-depth presets whose two steps need several GB (AdamW keeps two more copies of every
# weight): GPT-2 medium 350M (~6 GB), large 774M (~12 GB), XL 1.56B (~25 GB, more than the
# 23 GB machines these tests run on, so XL is trained at 2 of its 48 layers: every layer is
# the same block, so the shape is still checked).
HEAVY = {"gpt2-medium": {}, "gpt2-large": {}, "gpt2-xl": {"n_layer": 2}}
TRAINABLE = [name for name, p in PRESETS.items() if p.trainable]
SHAPE_ONLY = {"llama2-7b", "llama3-8b"}
REAL_WEIGHTS = {"smollm2-135m", "minilm-l6"}


def test_presets_hold_config_instances_and_buildable_tokenizer_kinds() -> None:
    """Each preset's config is an instance of its family's Config class, its tokenizer kind is
    one lmarch trains, and its training defaults make a valid TrainConfig."""
    for name, p in PRESETS.items():
        assert isinstance(p.config, FAMILIES[p.family].config_cls), name
        assert p.tokenizer in TOKENIZER_KINDS, name
        if p.trainable:
            TrainConfig(**p.train)
    assert {n for n, p in PRESETS.items() if p.use == "shape only"} == SHAPE_ONLY
    assert {n for n, p in PRESETS.items() if p.use == "weights"} == REAL_WEIGHTS


def test_preset_config_overrides_are_checked() -> None:
    """An override builds a new config (the preset's stays as it was); an unknown field or a
    value out of range is refused by name."""
    cfg = preset_config("gpt-char-tiny", n_layer=2)
    assert cfg.n_layer == 2 and get_preset("gpt-char-tiny").config.n_layer == 4
    with pytest.raises(LmarchError, match="n_layers"):
        preset_config("gpt-char-tiny", n_layers=2)
    with pytest.raises(LmarchError, match="n_head"):
        preset_config("gpt-char-tiny", n_head=3)


def test_shape_only_preset_is_refused_by_train(tmp_path) -> None:
    with pytest.raises(LmarchError, match="llama2-7b is shape only"):
        train_run("llama2-7b", "shakespeare", tmp_path / "r")


class _Snapshot(Callback):
    """Keeps the weights (parameters; buffers such as BART's fixed logits bias are not
    trained) as they were before the first step and after the last."""

    def on_train_start(self, trainer) -> None:
        self.before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}

    def on_train_end(self, trainer, result) -> None:
        self.after = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def _two_steps(name: str, text_file, tmp_path, **model_over) -> None:
    snap = _Snapshot()
    p = get_preset(name)
    overrides = {
        "max_iters": 2, "batch_size": 2, "eval_iters": 1, "eval_interval": 2, "warmup_iters": 0,
        "log_interval": 1, "block_size": min(p.config.block_size, 32 if p.family == "bert" else 16),
        "device": "cpu", **model_over,
    }  # fmt: skip
    if p.tokenizer in ("bpe", "roberta-bpe"):
        overrides["vocab_size"] = 300  # a small BPE: 256 bytes + a few merges
    if p.tokenizer == "wordpiece":
        overrides["vocab_size"] = 400
    result = train_run(name, str(text_file), tmp_path / name, overrides, callbacks=[snap])
    assert result.iters == 2
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    floats = [k for k, v in snap.before.items() if v.is_floating_point()]
    same = [k for k in floats if torch.equal(snap.before[k], snap.after[k])]
    assert floats and same == [], f"{name}: weights that did not move: {same}"


@pytest.mark.parametrize("name", [n for n in TRAINABLE if n not in HEAVY])
def test_every_trainable_preset_trains_two_steps(name, small_text_file, tmp_path) -> None:
    """Two steps of `lmarch train --preset NAME` at full width and depth (short sequences, two
    per batch, a small tokenizer of the preset's kind): losses are finite and every weight
    tensor moves (AdamW's first step moves each parameter that has a gradient by ~lr)."""
    _two_steps(name, small_text_file, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEAVY))
def test_heavy_presets_train_two_steps(name, small_text_file, tmp_path) -> None:
    """The GPT-2 medium/large/XL shapes, as above (slow: 6-12 GB and a minute each; XL at 2
    layers, see HEAVY)."""
    _two_steps(name, small_text_file, tmp_path, **HEAVY[name])


def _package_path(relative: str) -> Path:
    package, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(package)  # found without importing it (see DESIGN.md)
    if spec is None:
        pytest.skip(f"the weights package {package} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / rest


def _assert_same_config(preset_cfg, file_cfg) -> None:
    """Field for field; floats at float32 precision (GGUF stores its epsilons as float32)."""
    ours, theirs = dataclasses.asdict(preset_cfg), dataclasses.asdict(file_cfg)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if isinstance(value, float):
            assert theirs[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert theirs[key] == value, key


def test_smollm2_preset_is_what_its_gguf_says() -> None:
    """smollm2-135m's config equals the LlamaConfig read from the GGUF file's metadata."""
    from lmarch.weights.gguf import read_gguf
    from lmarch.weights.gguf_llama import llama_config_from_gguf

    preset = get_preset("smollm2-135m")
    gguf = read_gguf(_package_path(preset.weights))
    _assert_same_config(preset.config, llama_config_from_gguf(gguf))


def test_minilm_preset_is_what_its_config_json_says() -> None:
    """minilm-l6's config equals the BertConfig read from the folder's config.json."""
    from lmarch.weights.hf import read_hf_config
    from lmarch.weights.hf_bert import config_from_hf

    preset = get_preset("minilm-l6")
    folder = _package_path(preset.weights)
    _assert_same_config(preset.config, config_from_hf(read_hf_config(folder)))
