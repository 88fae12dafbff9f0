"""RoPE scalings against transformers' own rope functions: YaRN's frequencies and attention
factor, dynamic NTK's length-dependent base; and the refusals of scalings lmarch lacks."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmarch.nn.position import (
    DynamicNTKRotaryEmbedding,
    RotaryEmbedding,
    check_rope_scaling,
    dynamic_ntk_inverse_frequencies,
    rope_attention_factor,
    rope_inverse_frequencies,
    rotary_embedding,
)


def _hf_config(rope: dict, max_len: int = 64) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=max_len,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )  # fmt: skip


YARNS = [
    {"factor": 4.0, "original_max_position_embeddings": 16},
    {"factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 8, "beta_slow": 2},
    {"factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.3},
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.7},
    {"factor": 2.5, "original_max_position_embeddings": 16, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0, "beta_fast": 0},
]


@pytest.mark.parametrize("yarn", YARNS, ids=[str(sorted(y)) for y in YARNS])
def test_yarn_matches_transformers(yarn: dict) -> None:
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config({"rope_type": "yarn", **yarn}), "cpu")
    scaling = {"type": "yarn", **yarn}
    assert torch.allclose(rope_inverse_frequencies(64, 10000.0, scaling), expected, rtol=1e-6)
    assert rope_attention_factor(scaling) == pytest.approx(factor, rel=1e-12)


def test_yarn_tables_carry_the_attention_factor() -> None:
    """cos and sin are scaled by the factor, so q.k is scaled by its square."""
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    plain = RotaryEmbedding(64, 32, scaling=None)
    yarn = RotaryEmbedding(64, 32, scaling=scaling)
    factor = rope_attention_factor(scaling)
    assert factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert torch.allclose(yarn.cos[0], torch.full((64,), factor))
    assert torch.allclose(yarn.cos.square() + yarn.sin.square(), torch.full((32, 64), factor**2))
    assert not torch.allclose(yarn.cos, plain.cos * factor)  # and the frequencies differ


@pytest.mark.parametrize("length", [10, 64, 65, 100, 257])
def test_dynamic_ntk_matches_transformers(length: int) -> None:
    config = _hf_config({"rope_type": "dynamic", "factor": 3.0})
    fn = ROPE_INIT_FUNCTIONS["dynamic"]
    expected, _ = fn(config, "cpu", seq_len=torch.tensor(length))  # as its forward passes it
    got = dynamic_ntk_inverse_frequencies(64, 10000.0, 3.0, 64, length)
    assert torch.equal(got, expected)
    if length <= 64:  # up to the original context: plain RoPE
        assert torch.allclose(got, rope_inverse_frequencies(64, 10000.0), rtol=1e-6)


def test_dynamic_rotation_depends_on_the_call_length() -> None:
    """Within the original context the rotation is plain RoPE; past it, a call's last position
    sets the base for every position of the call; a tensor start gives the same as an int."""
    scaling = {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}
    rope = rotary_embedding(32, 64, scaling=scaling)
    assert isinstance(rope, DynamicNTKRotaryEmbedding) and not isinstance(rope, RotaryEmbedding)
    plain = RotaryEmbedding(32, 64)
    q, k = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    short = rope(q[:, :, :16], k[:, :, :16], 0)
    assert torch.equal(short[0], plain(q[:, :, :16], k[:, :, :16], 0)[0])
    long_q, _ = rope(q, k, 0)
    assert not torch.allclose(long_q[:, :, :16], short[0], atol=1e-3)  # the base grew
    step_int, _ = rope(q[:, :, 39:], k[:, :, 39:], 39)
    step_tensor, _ = rope(q[:, :, 39:], k[:, :, 39:], torch.tensor(39))
    assert torch.equal(step_int, step_tensor)
    assert torch.allclose(step_int, long_q[:, :, 39:], atol=1e-6)  # same length, same base
    with pytest.raises(ValueError, match="exceed 64"):
        rope(q, k, 30)


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"type": "longrope", "factor": 2.0}, "RoPE scaling type 'longrope' is not supported"),
        ({"type": "yarn", "factor": 2.0}, "original_max_position_embeddings must be a number > 0"),
        ({"type": "linear"}, "factor must be a number > 0, got None"),
        ({"type": "linear", "factor": True}, "factor must be a number > 0, got True"),
        ({"type": "dynamic", "factor": 2.0, "low_freq_factor": 1}, "key 'low_freq_factor'"),
        ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "truncate": 1},
         "truncate must be true or false"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 8}, "high_freq_factor must exceed low_freq_factor"),
    ],
)  # fmt: skip
def test_unsupported_scalings_are_named(scaling: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_rope_scaling(scaling, 64)
    with pytest.raises(ValueError):
        rotary_embedding(64, 32, scaling=scaling)
