"""safetensors I/O: tied tensors stored once, exact round trips, clear errors on bad files, and
writes that never leave a half-written file behind."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmarch.errors import LmarchError
from lmarch.models import GPT
from lmarch.models.gpt import GPTConfig
from lmarch.weights.safetensors_io import (
    atomic_write,
    load_into_model,
    load_tensors,
    save_tensors,
    unique_state_dict,
)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))


def test_unique_state_dict_drops_the_tied_lm_head_alias() -> None:
    model = tiny_gpt()
    full = model.state_dict()
    unique = unique_state_dict(model)
    assert model.lm_head.weight is model.tok_emb.weight
    assert set(full) - set(unique) == {"lm_head.weight"}
    for name, tensor in unique.items():
        assert torch.equal(tensor, full[name]) and tensor.is_contiguous()


def test_save_load_round_trip_restores_tensors_and_tying(tmp_path: Path) -> None:
    source = tiny_gpt(seed=1)
    path = tmp_path / "model.safetensors"
    save_tensors(unique_state_dict(source), path, metadata={"format": "pt"})
    with safe_open(str(path), "pt") as f:
        names, metadata = list(f.keys()), f.metadata()
    assert "lm_head.weight" not in names and "tok_emb.weight" in names
    assert metadata == {"format": "pt"}

    target = tiny_gpt(seed=2)
    load_into_model(target, load_tensors(path))
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert target.lm_head.weight is target.tok_emb.weight
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(target.eval()(ids), source.eval()(ids))


def test_round_trip_keeps_dtypes_and_non_contiguous_inputs(tmp_path: Path) -> None:
    tensors = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "int": torch.arange(12, dtype=torch.int64).view(3, 4),
        "transposed": torch.randn(4, 3).t(),  # not contiguous
    }
    save_tensors(tensors, tmp_path / "t.safetensors")
    back = load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_load_into_model_names_a_missing_tensor() -> None:
    model = tiny_gpt()
    tensors = unique_state_dict(model)
    del tensors["blocks.0.attn.qkv.bias"]
    with pytest.raises(LmarchError, match=r"ckpt do not fit the model: missing.*attn\.qkv\.bias"):
        load_into_model(model, tensors, source="ckpt")


def test_load_into_model_names_an_unexpected_tensor() -> None:
    model = tiny_gpt()
    tensors = unique_state_dict(model)
    tensors["blocks.0.attn.rotary.freqs"] = torch.zeros(2)
    with pytest.raises(LmarchError, match=r"unexpected.*blocks\.0\.attn\.rotary\.freqs"):
        load_into_model(model, tensors)


def test_load_into_model_names_a_shape_mismatch_and_leaves_model_untouched() -> None:
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: torch.zeros_like(v) for k, v in unique_state_dict(model).items()}
    tensors["pos_emb.weight"] = torch.zeros(16, 8)
    with pytest.raises(
        LmarchError, match=r"tensor pos_emb\.weight has shape \(16, 8\), model expects \(8, 8\)"
    ):
        load_into_model(model, tensors)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def valid_file_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    save_tensors({"w": torch.arange(64, dtype=torch.float32)}, path)
    return path.read_bytes()


def header_file(header: bytes, data: bytes = b"\0" * 8) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


CORRUPT = {
    "truncated": lambda good: good[: len(good) - 40],
    "garbage": lambda good: bytes(range(256)) * 4,
    "absurd_header_length": lambda good: struct.pack("<Q", 2**62) + b"{}",
    "empty": lambda good: b"",
    "header_not_json": lambda good: header_file(b"{not json}"),
    "absurd_shape": lambda good: header_file(
        b'{"w":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,8]}}'
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_lmarch_error_naming_it_quickly(tmp_path: Path, case: str) -> None:
    """Malformed bytes give one LmarchError with the file's path, without allocating or hanging."""
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(CORRUPT[case](valid_file_bytes(tmp_path)))
    t0 = time.perf_counter()
    with pytest.raises(LmarchError, match=f"cannot read safetensors file .*{case}.safetensors"):
        load_tensors(path)
    assert time.perf_counter() - t0 < 1.0


def test_missing_file_raises_lmarch_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LmarchError, match="weights file not found: .*nowhere.safetensors"):
        load_tensors(tmp_path / "nowhere.safetensors")


def test_atomic_write_keeps_old_file_when_writer_raises_midway(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(b"old contents")

    def crashing_writer(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, crashing_writer)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]  # no temp file left

    atomic_write(path, lambda tmp: tmp.write_bytes(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_atomic_write_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "w.safetensors"
    save_tensors({"x": torch.ones(2)}, path)
    assert torch.equal(load_tensors(path)["x"], torch.ones(2))


def test_atomic_write_gives_the_permissions_a_plain_write_would(tmp_path: Path) -> None:
    """Files written atomically must be as readable as ones written with open() (umask applied),
    not private 0600 temp files: exported model folders are meant to be shared."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write(atomic, lambda tmp: tmp.write_text("x"))
    assert oct(os.stat(atomic).st_mode & 0o777) == oct(os.stat(plain).st_mode & 0o777)
