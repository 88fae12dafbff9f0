"""llama.cpp's Q/K row interleave is undone by one gather (numpy, cached row order) with the same
result as the reshape formula, for float weights and for the raw bytes of quantised blocks."""

from __future__ import annotations

import pytest
import torch

from lmarch.weights.gguf_llama import permute_rope_rows, unpermute_rope_rows


def by_reshape(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The definition: rows (h, j, t) -> (h, t, j) for each head h."""
    out_dim = weight.shape[0]
    hd = out_dim // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(out_dim, *rest)


@pytest.mark.parametrize(
    "weight",
    [
        torch.randn(192, 40, generator=torch.Generator().manual_seed(0)),
        torch.randint(0, 256, (192, 60), dtype=torch.uint8),  # Q4_1 rows of blocks
        torch.randint(-9999, 9999, (192, 3, 2), dtype=torch.int16),  # (d, m) bits
        torch.randn(192, 8).bfloat16(),  # no numpy dtype: the torch route
        torch.randn(40, 192).t(),  # not contiguous
    ],
)
@pytest.mark.parametrize("n_heads", [1, 3])
def test_unpermute_equals_the_reshape_and_inverts_permute(
    weight: torch.Tensor, n_heads: int
) -> None:
    out = unpermute_rope_rows(weight, n_heads)
    assert out.dtype == weight.dtype and torch.equal(out, by_reshape(weight, n_heads))
    assert torch.equal(permute_rope_rows(out, n_heads), weight)
