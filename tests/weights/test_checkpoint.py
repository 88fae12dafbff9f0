"""Run-folder checkpoints (atomic swap, recovery after a crash), JSON errors, name maps and
Hugging Face folders (single file and sharded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.models import GPT
from lmarch.models.gpt import GPTConfig
from lmarch.models.registry import config_to_dict
from lmarch.tokenizers.char import CharTokenizer
from lmarch.weights.checkpoint import (
    find_checkpoint,
    load_run,
    read_json,
    write_checkpoint,
    write_json,
)
from lmarch.weights.hf import read_hf_config, read_hf_weights, write_hf_folder
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import load_tensors, save_tensors, unique_state_dict


def text_writer(text: str):
    return lambda path: Path(path).write_text(text)


def weights_writer(value: float):
    return lambda path: save_tensors({"w": torch.full((2,), value)}, path)


def checkpoint_value(folder: Path) -> float:
    return load_tensors(folder / "model.safetensors")["w"][0].item()


# --- the atomic checkpoint swap ----------------------------------------------------------------


def test_write_checkpoint_swaps_in_the_new_checkpoint_and_cleans_up(tmp_path: Path) -> None:
    first = write_checkpoint(tmp_path, {"model.safetensors": weights_writer(1.0)})
    assert first == tmp_path / "checkpoint" and checkpoint_value(first) == 1.0
    write_checkpoint(
        tmp_path, {"model.safetensors": weights_writer(2.0), "trainer.json": text_writer("{}")}
    )
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert checkpoint_value(tmp_path / "checkpoint") == 2.0
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["model.safetensors", "trainer.json"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no .tmp or .old left behind


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"model.safetensors": weights_writer(1.0)})

    def dies(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, {"model.safetensors": weights_writer(2.0), "x": dies})
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert checkpoint_value(tmp_path / "checkpoint") == 1.0


def test_crash_between_the_two_renames_finds_checkpoint_old(tmp_path: Path) -> None:
    """Killed after checkpoint -> checkpoint.old but before checkpoint.tmp -> checkpoint: the old
    one is the last complete checkpoint, and the next save recovers the normal layout."""
    write_checkpoint(tmp_path, {"model.safetensors": weights_writer(1.0)})
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    weights_writer(2.0)(tmp_path / "checkpoint.tmp" / "model.safetensors")

    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint.old" and checkpoint_value(found) == 1.0

    write_checkpoint(tmp_path, {"model.safetensors": weights_writer(3.0)})
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert checkpoint_value(tmp_path / "checkpoint") == 3.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_stale_checkpoint_tmp_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.tmp").mkdir()
    weights_writer(9.0)(tmp_path / "checkpoint.tmp" / "model.safetensors")
    assert find_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path, {"model.safetensors": weights_writer(1.0)})
    (tmp_path / "checkpoint.tmp").mkdir()
    weights_writer(9.0)(tmp_path / "checkpoint.tmp" / "model.safetensors")
    assert checkpoint_value(find_checkpoint(tmp_path)) == 1.0


def test_checkpoint_folder_without_weights_does_not_count(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer.json").write_text("{}")
    assert find_checkpoint(tmp_path) is None


def test_load_run_restores_the_model_from_checkpoint_old_after_a_crash(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config).eval()
    tokenizer = CharTokenizer.from_text("abcdefghijk")
    tokenizer.save(tmp_path / "tokenizer.json")
    write_json(tmp_path / "config.json", {"model": config_to_dict(config)})
    write_checkpoint(
        tmp_path,
        {"model.safetensors": lambda p: save_tensors(unique_state_dict(model), p)},
    )
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")

    loaded, tok, run_config = load_run(tmp_path)
    assert run_config["model"]["family"] == config_to_dict(config)["family"]
    assert tok.encode("cab") == tokenizer.encode("cab")
    ids = torch.tensor([[1, 4, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_load_run_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    write_json(tmp_path / "config.json", {"model": config_to_dict(config)})
    with pytest.raises(LmarchError, match="has no checkpoint yet"):
        load_run(tmp_path)
    with pytest.raises(LmarchError, match="run folder not found"):
        load_run(tmp_path / "nope")


# --- JSON --------------------------------------------------------------------------------------


def test_write_json_then_read_json_round_trips(tmp_path: Path) -> None:
    data = {"b": [1, 2.5, None], "a": {"nested": "ü"}}
    write_json(tmp_path / "x.json", data)
    assert read_json(tmp_path / "x.json") == data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found: .*broken.json"),
        (b'{"step": 3,', "cannot read .*broken.json"),
        (b"\xff\xfe\x00\x80 binary", "cannot read .*broken.json"),  # not UTF-8 at all
    ],
    ids=["missing", "truncated_json", "not_utf8"],
)
def test_read_json_errors_name_the_file(tmp_path: Path, content: bytes | None, message: str):
    path = tmp_path / "broken.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LmarchError, match=message):
        read_json(path)


# --- name maps ---------------------------------------------------------------------------------

TOY_MAP = WeightMap(
    [
        Rule("emb.weight", "model.embed.weight"),
        Rule("layers.{i}.proj.weight", "model.h.{i}.conv.weight", transpose=True),
        Rule("layers.{i}.proj.bias", "model.h.{i}.conv.bias"),
    ],
    ignore=[r"\.attn\.masked_bias$"],
)


def toy_ours() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {"emb.weight": torch.randn(5, 3, generator=g)}
    for i in range(2):
        out[f"layers.{i}.proj.weight"] = torch.randn(4, 3, generator=g)
        out[f"layers.{i}.proj.bias"] = torch.randn(4, generator=g)
    return out


def test_weight_map_round_trip_with_transpose() -> None:
    ours = toy_ours()
    theirs = TOY_MAP.to_theirs(ours, n_layers=2)
    assert sorted(theirs) == sorted(
        ["model.embed.weight"]
        + [f"model.h.{i}.conv.{p}" for i in range(2) for p in ("weight", "bias")]
    )
    assert torch.equal(theirs["model.h.1.conv.weight"], ours["layers.1.proj.weight"].T)
    assert theirs["model.h.1.conv.weight"].is_contiguous()
    assert torch.equal(theirs["model.h.0.conv.bias"], ours["layers.0.proj.bias"])
    back = TOY_MAP.to_ours(theirs, n_layers=2)
    assert sorted(back) == sorted(ours)
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name


def test_weight_map_ignores_listed_patterns_and_rejects_unknown_tensors() -> None:
    theirs = TOY_MAP.to_theirs(toy_ours(), n_layers=2)
    theirs["model.h.0.attn.masked_bias"] = torch.zeros(1)
    assert "model.h.0.attn.masked_bias" not in TOY_MAP.to_ours(theirs, n_layers=2)
    theirs["model.h.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(LmarchError, match=r"ckpt: unexpected tensors \['model\.h\.0\.extra"):
        TOY_MAP.to_ours(theirs, n_layers=2, where="ckpt")


def test_weight_map_names_a_missing_tensor() -> None:
    theirs = TOY_MAP.to_theirs(toy_ours(), n_layers=2)
    del theirs["model.h.1.conv.bias"]
    with pytest.raises(LmarchError, match=r"folder: tensor 'model\.h\.1\.conv\.bias' is missing"):
        TOY_MAP.to_ours(theirs, n_layers=2, where="folder")
    with pytest.raises(LmarchError, match="'layers.2.proj.weight' is missing"):
        TOY_MAP.to_theirs(toy_ours(), n_layers=3)


# --- Hugging Face folders ----------------------------------------------------------------------


def hf_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed.weight": torch.randn(6, 4, generator=g),
        "model.h.0.conv.weight": torch.randn(4, 4, generator=g),
        "model.h.1.conv.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(6, 4, generator=g),
    }


def test_read_hf_weights_of_a_sharded_folder_equals_the_single_file(tmp_path: Path) -> None:
    tensors = hf_tensors()
    write_hf_folder(tmp_path / "single", {"model_type": "toy"}, tensors)
    sharded = tmp_path / "sharded"
    shards = {
        "model-00001-of-00002.safetensors": ["model.embed.weight", "model.h.0.conv.weight"],
        "model-00002-of-00002.safetensors": ["model.h.1.conv.weight", "lm_head.weight"],
    }
    for shard, names in shards.items():
        save_tensors({n: tensors[n] for n in names}, sharded / shard)
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {n: shard for shard, names in shards.items() for n in names},
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    single = read_hf_weights(tmp_path / "single")
    from_shards = read_hf_weights(sharded)
    assert sorted(single) == sorted(from_shards) == sorted(tensors)
    for name, tensor in tensors.items():
        assert from_shards[name].dtype == tensor.dtype
        assert torch.equal(from_shards[name], tensor) and torch.equal(single[name], tensor)
    assert read_hf_config(tmp_path / "single") == {"model_type": "toy"}


def test_hf_folder_errors_name_the_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(LmarchError, match="no model.safetensors or model.safetensors.index.json"):
        read_hf_weights(tmp_path)
    with pytest.raises(LmarchError, match="no config.json in"):
        read_hf_config(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(LmarchError, match="index.json is not a valid safetensors index"):
        read_hf_weights(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(LmarchError, match="config.json is not valid JSON"):
        read_hf_config(tmp_path)


def test_hf_index_naming_a_missing_shard_names_the_shard(tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LmarchError, match="not found: .*model-00001-of-00002.safetensors"):
        read_hf_weights(tmp_path)


def test_hf_config_that_is_not_utf8_raises_lmarch_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(LmarchError, match="config.json"):
        read_hf_config(tmp_path)
