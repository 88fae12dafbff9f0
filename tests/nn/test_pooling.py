"""Pooling token states into sentence vectors: each mode against its definition written as a loop,
and padding must not change the result."""

from __future__ import annotations

import pytest
import torch

from lmarch.nn.pooling import l2_normalize, pool


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 5, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    return hidden, mask


def test_modes_follow_their_definitions() -> None:
    hidden, mask = batch()
    for b in range(3):
        real = hidden[b, : int(mask[b].sum())]
        assert torch.allclose(pool(hidden, mask, "mean")[b], real.mean(dim=0), atol=1e-6)
        assert torch.equal(pool(hidden, mask, "max")[b], real.max(dim=0).values)
        assert torch.equal(pool(hidden, mask, "cls")[b], hidden[b, 0])


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_pad_positions_do_not_matter(mode: str) -> None:
    hidden, mask = batch()
    noisy = hidden.masked_fill(mask[..., None] == 0, 1e4)  # huge values where the pads are
    assert torch.allclose(pool(hidden, mask, mode), pool(noisy, mask, mode), atol=1e-6)


def test_without_a_mask_every_token_counts() -> None:
    hidden, _ = batch()
    assert torch.allclose(pool(hidden, None, "mean"), hidden.mean(dim=1))
    assert torch.equal(pool(hidden, None, "max"), hidden.amax(dim=1))


def test_l2_normalize_gives_unit_vectors_in_the_same_direction() -> None:
    hidden, mask = batch()
    emb = pool(hidden, mask, "mean")
    unit = l2_normalize(emb)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(unit * emb.norm(dim=-1, keepdim=True), emb, atol=1e-6)
    assert torch.equal(l2_normalize(torch.zeros(1, 5)), torch.zeros(1, 5))  # no 0/0


def test_unknown_mode_is_an_error() -> None:
    hidden, mask = batch()
    with pytest.raises(ValueError, match="pooling mode"):
        pool(hidden, mask, "median")
