"""T5's relative position bias (Raffel et al. 2020, sec. 2.1; Shaw et al. 2018).

T5 has no position embeddings. Instead each attention head adds a learned scalar to the score of
query position i and key position j that depends only on the offset j - i, through a bucket:

    score(i, j) = q_i . k_j + b_head[bucket(j - i)]

Offsets below ``n_buckets / 2`` (half that, per direction, when bidirectional) get a bucket each;
larger ones share logarithmically wider buckets up to ``max_distance``, beyond which all offsets
share the last bucket. The encoder's buckets are bidirectional (sign kept: keys before and after
the query differ); the decoder's are causal (only keys at or before the query exist). One table
is learned in the first layer of each stack and the bias it gives is shared by all layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_position_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """Bucket index in [0, num_buckets) of each offset ``key_position - query_position``.

    Bidirectional: half the buckets for keys after the query, half for those at or before it.
    Within a direction, offsets n < max_exact = buckets / 2 map to n; larger ones to
    max_exact + floor(log(n / max_exact) / log(max_distance / max_exact) * (buckets - max_exact)),
    capped at the last bucket. Causal: keys after the query (which a decoder never sees) map to 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(0) appears for small n, whose bucket comes from the other branch of the where
    large = (
        max_exact
        + (
            torch.log(n.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """The learned table of T5's relative position bias: ``embedding`` [num_buckets, n_heads].

    ``forward(n_queries, n_keys, offset)`` gives the additive bias [1, n_heads, n_queries, n_keys]
    for queries at positions ``offset .. offset + n_queries - 1`` over keys at ``0 .. n_keys - 1``
    (a decoding step passes its position as ``offset``), ready for the ``position_bias`` argument
    of :class:`~lmarch.nn.attention.MultiHeadAttention`.
    """

    def __init__(
        self,
        n_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, n_queries: int, n_keys: int, offset: int | Tensor = 0) -> Tensor:
        """Bias [1, n_heads, n_queries, n_keys] for the offsets key - query."""
        device = self.embedding.weight.device
        query = torch.arange(n_queries, device=device)[:, None] + offset
        key = torch.arange(n_keys, device=device)[None, :]
        buckets = relative_position_bucket(
            key - query, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


__all__ = ["RelativePositionBias", "relative_position_bucket"]
