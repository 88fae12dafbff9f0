"""Rotary position embeddings: the rotation formula, relative-position property, scalings."""

from __future__ import annotations

import math

import torch

from lmarch.nn import RotaryEmbedding, apply_rotary, rope_inverse_frequencies


def test_rotation_of_one_pair_matches_the_complex_formula() -> None:
    """Pair (x_j, x_{j+d/2}) at position m becomes (x_j + i x_{j+d/2}) * e^{i m omega_j}."""
    d, m = 8, 5
    rope = RotaryEmbedding(d, 16, theta=10000.0)
    x = torch.randn(1, 1, 6, d)
    q, _ = rope(x, x, start=0)
    for j in range(d // 2):
        omega = 10000.0 ** (-2 * j / d)
        z = complex(x[0, 0, m, j], x[0, 0, m, j + d // 2]) * complex(
            math.cos(m * omega), math.sin(m * omega)
        )
        assert abs(q[0, 0, m, j].item() - z.real) < 1e-5
        assert abs(q[0, 0, m, j + d // 2].item() - z.imag) < 1e-5


def test_scores_depend_only_on_relative_position() -> None:
    """q_m . k_n is the same for (m, n) = (3, 1) and (13, 11)."""
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        qm, _ = rope(q, q, start=m)
        _, kn = rope(k, k, start=n)
        return (qm * kn).sum().item()

    assert abs(score(3, 1) - score(13, 11)) < 1e-4


def test_partial_rotary_leaves_the_tail_untouched() -> None:
    """With rotary_dim 4 of head_dim 8 the last 4 dims pass through unchanged."""
    rope = RotaryEmbedding(8, 16, rotary_dim=4)
    x = torch.randn(2, 3, 5, 8)
    q, k = rope(x, x, start=2)
    assert torch.equal(q[..., 4:], x[..., 4:])
    full = RotaryEmbedding(4, 16)
    expected, _ = full(x[..., :4], x[..., :4], start=2)
    assert torch.allclose(q[..., :4], expected, atol=1e-6)


def test_scalings() -> None:
    """Linear divides every frequency; NTK raises theta by factor^(d/(d-2)); llama3 keeps the
    highest frequencies and divides the lowest by the factor."""
    base = rope_inverse_frequencies(64, 10000.0)
    linear = rope_inverse_frequencies(64, 10000.0, {"type": "linear", "factor": 4.0})
    assert torch.allclose(linear, base / 4)
    ntk = rope_inverse_frequencies(64, 10000.0, {"type": "ntk", "factor": 4.0})
    assert torch.allclose(ntk, rope_inverse_frequencies(64, 10000.0 * 4 ** (64 / 62)))
    l3 = rope_inverse_frequencies(
        64, 500000.0,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    )  # fmt: skip
    plain = rope_inverse_frequencies(64, 500000.0)
    assert l3[0] == plain[0] and torch.allclose(l3[-1], plain[-1] / 8)


def test_apply_rotary_is_a_rotation() -> None:
    """Rotation preserves norms pairwise."""
    x = torch.randn(4, 10)
    angles = torch.rand(10 // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    assert torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
