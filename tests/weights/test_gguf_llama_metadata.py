"""A LLaMA GGUF whose metadata contradicts itself or its tensors is refused before any model is
built, with one line naming the metadata key and its value."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.models import Llama
from lmarch.nn.position import rope_inverse_frequencies
from lmarch.weights.gguf_llama import load_gguf_llama

gguf = pytest.importorskip("gguf")

META: dict[str, Any] = {
    "block_count": 2,
    "context_length": 64,
    "embedding_length": 32,
    "feed_forward_length": 48,
    "attention.head_count": 4,
    "attention.head_count_kv": 2,
    "vocab_size": 40,
    "attention.layer_norm_rms_epsilon": 1e-5,
    "rope.freq_base": 10000.0,
}


def _tensors(n_layer: int = 2) -> dict[str, tuple[int, ...]]:
    """PyTorch-order shapes of a file with META's dimensions (head width 8)."""
    shapes = {"token_embd.weight": (40, 32), "output_norm.weight": (32,)}
    for i in range(n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (32,),
            f"blk.{i}.attn_q.weight": (32, 32),
            f"blk.{i}.attn_k.weight": (16, 32),
            f"blk.{i}.attn_v.weight": (16, 32),
            f"blk.{i}.attn_output.weight": (32, 32),
            f"blk.{i}.ffn_norm.weight": (32,),
            f"blk.{i}.ffn_gate.weight": (48, 32),
            f"blk.{i}.ffn_up.weight": (48, 32),
            f"blk.{i}.ffn_down.weight": (32, 48),
        }
    return shapes


def _write(
    path: Path,
    meta: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    values: dict[str, np.ndarray] | None = None,
) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(f"llama.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"llama.{key}", value)
        else:
            w.add_uint64(f"llama.{key}", value)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        value = (values or {}).get(name)
        if value is None:
            value = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, np.asarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("changes", "factor"),
    [
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, 4.0),
        ({"rope.scaling.factor": 2.0}, 2.0),  # llama.cpp's default type is linear
        ({"rope.scale_linear": 3.0}, 3.0),  # the older key
        ({"rope.scaling.factor": 0.0}, None),  # 0 means no scaling
        ({"rope.scaling.type": "yarn", "rope.scaling.factor": 1.0}, None),
    ],
)
def test_linear_rope_scaling_as_llama_cpp_reads_it(
    tmp_path: Path, changes: dict[str, Any], factor: float | None
) -> None:
    model, _ = load_gguf_llama(_write(tmp_path / "s.gguf", {**META, **changes}, _tensors()))
    expected = None if factor is None else {"type": "linear", "factor": factor}
    assert model.config.rope_scaling == expected


def test_consistent_file_loads(tmp_path: Path) -> None:
    model, _ = load_gguf_llama(_write(tmp_path / "ok.gguf", META, _tensors()))
    c = model.config
    assert (c.n_layer, c.n_head, c.kv_heads, c.dim_per_head, c.vocab_size) == (2, 4, 2, 8, 40)
    ids = torch.tensor([[1, 5, 9]])
    assert model(ids).shape == (1, 3, 40)


# (metadata changes, the message after "<path>: ")
BAD_METADATA = [
    ({"attention.head_count": 7}, "metadata llama.attention.head_count_kv=2 must divide llama.attention.head_count=7"),
    (
        {"attention.head_count": 7, "attention.head_count_kv": 7},
        "metadata llama.attention.head_count=7 does not divide llama.embedding_length=32",
    ),
    ({"attention.head_count": 0}, "metadata llama.attention.head_count=0 must be a whole number >= 1"),
    ({"attention.head_count_kv": 0}, "metadata llama.attention.head_count_kv=0 must be a whole number >= 1"),
    ({"attention.head_count_kv": 5}, "metadata llama.attention.head_count_kv=5 must divide llama.attention.head_count=4"),
    (
        {"attention.head_count_kv": 4},
        "metadata llama.attention.head_count_kv=4 contradicts tensor 'blk.0.attn_k.weight' of shape (16, 32) "
        "(expects head_count_kv x head width = 4 x 8 rows, the width from head_count=4)",
    ),
    (
        {"attention.head_count": 8},
        "metadata llama.attention.head_count_kv=2 contradicts tensor 'blk.0.attn_k.weight' of shape (16, 32) "
        "(expects head_count_kv x head width = 2 x 4 rows, the width from head_count=8)",
    ),
    (
        {"attention.key_length": 6, "rope.dimension_count": 6, "attention.value_length": 6},
        "metadata llama.attention.key_length=6 contradicts tensor 'blk.0.attn_q.weight' of shape (32, 32) "
        "(expects head_count x head width = 4 x 6 rows)",
    ),
    ({"attention.value_length": 4}, "metadata llama.attention.value_length=4 differs from the key width 8; lmarch's attention needs them equal"),
    ({"context_length": 0}, "metadata llama.context_length=0 must be a whole number >= 1"),
    ({"context_length": None}, "metadata key 'llama.context_length' is missing"),
    (
        {"context_length": 1 << 40},
        "metadata llama.context_length=1099511627776 is beyond 16777216: the rotary tables alone would not fit in memory",
    ),
    ({"block_count": "2"}, "metadata llama.block_count='2' must be a whole number >= 1"),
    ({"block_count": 3}, "metadata llama.block_count=3 contradicts the tensors, which hold blocks 0..1"),
    ({"embedding_length": 64}, "metadata llama.embedding_length=64 contradicts tensor 'token_embd.weight' of shape (40, 32) (its columns)"),
    ({"feed_forward_length": 50}, "metadata llama.feed_forward_length=50 contradicts tensor 'blk.0.ffn_gate.weight' of shape (48, 32) (rows)"),
    ({"vocab_size": 41}, "the vocabulary has 41 tokens (llama.vocab_size or tokenizer.ggml.tokens) but 'token_embd.weight' has 40 rows"),
    ({"rope.dimension_count": 3}, "metadata llama.rope.dimension_count=3 must be even and at most the head width 8"),
    ({"rope.dimension_count": 10}, "metadata llama.rope.dimension_count=10 must be even and at most the head width 8"),
    ({"attention.layer_norm_rms_epsilon": -1.0}, "metadata llama.attention.layer_norm_rms_epsilon=-1.0 must be a number > 0"),
    ({"rope.freq_base": "x"}, "metadata llama.rope.freq_base='x' must be a number > 0"),
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, "metadata llama.rope.scaling.type='yarn' with llama.rope.scaling.factor=4.0 is not supported"),
    ({"rope.scaling.type": "none", "rope.scale_linear": 2.0}, "metadata llama.rope.scaling.type='none' with llama.rope.scale_linear=2.0 is not supported"),
    ({"rope.scaling.factor": "x"}, "metadata llama.rope.scaling.factor='x' must be a number > 0"),
    ({"expert_count": 8}, "metadata llama.expert_count=8: mixture-of-experts LLaMA files (Mixtral) are not supported"),
    ({"rope.scaling.type": "longrope"}, "metadata llama.rope.scaling.type='longrope' is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), BAD_METADATA, ids=[m for _, m in BAD_METADATA])
def test_contradictory_metadata_is_one_clear_error(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path / "bad.gguf", {**META, **changes}, _tensors())
    with pytest.raises(LmarchError) as info:
        load_gguf_llama(path)
    assert str(info.value) == f"{path}: {message}"


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    shapes = _tensors() | {"blk.1.ffn_down.weight": (32, 40)}
    path = _write(tmp_path / "bad.gguf", META, shapes)
    with pytest.raises(LmarchError) as info:
        load_gguf_llama(path)
    expected = "tensor 'blk.1.ffn_down.weight' has shape (32, 40), the metadata implies (32, 48)"
    assert str(info.value) == f"{path}: {expected}"


LLAMA3 = {
    "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip


def test_rope_freqs_tensor_is_applied_as_llama_cpp_does(tmp_path: Path) -> None:
    """Llama 3.1 GGUFs keep their RoPE scaling as a rope_freqs tensor of per-frequency divisors
    (the converter's 1 / (ratio)); the model then equals one built with that llama3 scaling,
    and differs from plain RoPE (so ignoring the tensor would be a silent wrong answer)."""
    plain = rope_inverse_frequencies(8, 10000.0)
    factors = (plain / rope_inverse_frequencies(8, 10000.0, LLAMA3)).numpy()
    assert factors[0] == 1.0 and 1.0 < factors[1] < 8.0 and factors[-1] == pytest.approx(8.0)
    path = tmp_path / "llama31.gguf"
    _write(path, META, _tensors() | {"rope_freqs.weight": (4,)}, {"rope_freqs.weight": factors})
    model, _ = load_gguf_llama(path)
    assert model.config.rope_scaling["type"] == "factors"
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 3])
    with torch.no_grad():
        got = model(ids)
        for scaling, close in ((LLAMA3, True), (None, False)):
            ref = Llama(dataclasses.replace(model.config, rope_scaling=scaling)).eval()
            ref.load_state_dict(model.state_dict())
            err = (ref(ids) - got).abs().max().item()
            assert (err <= 1e-5) == close, (scaling, err)


def test_rope_freqs_of_the_wrong_size_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.gguf", META, _tensors() | {"rope_freqs.weight": (8,)})
    with pytest.raises(LmarchError) as info:
        load_gguf_llama(path)
    expected = "tensor 'rope_freqs.weight' has shape (8,), the rotary width 8 implies (4,)"
    assert str(info.value) == f"{path}: {expected}"
