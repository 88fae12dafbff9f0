"""save_loaded: whatever lmarch.load returned comes back from the run folder it writes with the
same logits (exactly), the same token ids and the same chat convention."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.loading import ChatConvention, load
from lmarch.loading.saving import chat_from_config, save_loaded
from lmarch.weights.checkpoint import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))


def test_run_folder_round_trip_keeps_weights_tokenizer_and_chat(tiny_run, tmp_path) -> None:
    loaded = load(tiny_run, quant="none")
    loaded.chat = ChatConvention("{{ messages }}", (3, 5), 1, True)
    out = save_loaded(loaded, tmp_path / "copy", extra={"note": "kept"})
    back = load(out, quant="none")
    text = "To be, or not to be"
    assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text)
    assert back.chat == loaded.chat
    assert back.encode_prompt(text)[0] == 1  # add_bos came back with the BOS id
    ids = loaded.tokenizer.encode(text)
    assert torch.equal(_logits(back.model, ids), _logits(loaded.model, ids))
    config = read_json(out / "config.json")
    assert (config["objective"], config["note"], config["source"]) == ("clm", "kept", loaded.name)


def test_smollm2_from_gguf_saves_as_a_run_with_its_chat_template(tmp_path) -> None:
    loaded = load("smollm2-135m", quant="none", context=64)
    out = save_loaded(loaded, tmp_path / "smol")
    back = load(out, quant="none")
    assert back.chat == loaded.chat and back.chat.template  # SmolLM2 is a chat model
    text = "<|im_start|>user\nWhat is 2+2? Ünïcode ✓<|im_end|>"
    assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text)
    ids = loaded.encode_prompt("The capital of France is")
    assert torch.equal(_logits(back.model, ids), _logits(loaded.model, ids))


def test_a_classifier_is_refused_by_name(tiny_run, tmp_path) -> None:
    loaded = load(tiny_run, quant="none")
    loaded = dataclasses.replace(loaded, objective="classifier", name="mine")
    with pytest.raises(LmarchError, match="mine holds a text classifier"):
        save_loaded(loaded, tmp_path / "x")


def test_a_folder_without_config_is_not_a_model(tiny_run, tmp_path) -> None:
    out = save_loaded(load(tiny_run, quant="none"), tmp_path / "cut")
    (out / "config.json").unlink()  # what a write cut short before its last file leaves
    with pytest.raises(LmarchError, match="no model at"):
        load(out)
    shutil.rmtree(out)


def test_damaged_chat_entry_is_one_clear_error() -> None:
    with pytest.raises(LmarchError, match="'chat' entry is damaged"):
        chat_from_config({"chat": {"stop_token_ids": ["x"]}})
    assert chat_from_config({}) == ChatConvention()
