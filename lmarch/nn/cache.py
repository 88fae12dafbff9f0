"""Key/value cache for autoregressive decoding.

At step t a decoder only needs the new token's query; the keys and values of tokens 0..t-1 are the
same as before, so they are kept instead of recomputed. The cache here is static: one buffer per
layer of shape [batch, n_kv_heads, max_len, head_dim] is allocated up front, and each step writes
into it in place, so decoding allocates nothing per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Preallocated keys and values for every layer of a decoder.

    ``update(layer, k, v, start)`` writes positions ``start .. start+T-1`` and returns views of
    positions ``0 .. start+T-1``: everything the new queries may attend to.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        # one view per layer, made once: indexing the 5-d buffers on every call costs more
        # than the copy itself when decoding one token
        self._layer_keys = self.keys.unbind(0)
        self._layer_values = self.values.unbind(0)

    @classmethod
    def like(
        cls,
        reference: Tensor,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache on ``reference``'s device, in its dtype unless ``dtype`` is given — except
        that half-precision weights on a CPU get a float32 cache: attention's batched products
        run ~6x faster in float32 there (CPUs without bf16 arithmetic emulate it), and the
        cache of a small model is small."""
        if dtype is None and reference.device.type == "cpu" and reference.element_size() < 4:
            dtype = torch.float32
        return cls(
            n_layers,
            batch_size,
            n_kv_heads,
            max_len,
            head_dim,
            dtype=dtype or reference.dtype,
            device=reference.device,
        )

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s whole key and value buffers, [B, H_kv, max_len, D] each (for kernels
        that write and read the cache themselves)."""
        return self._layer_keys[layer], self._layer_values[layer]

    def reorder(self, indices: Tensor, length: int | None = None) -> None:
        """Make batch row ``i`` a copy of old row ``indices[i]`` (beam search: each surviving
        beam takes over its parent's keys and values), in place, for the first ``length``
        positions (default: all)."""
        end = self.max_len if length is None else length
        for buffer in (self.keys, self.values):
            filled = buffer.narrow(3, 0, end)
            filled.copy_(filled.index_select(1, indices.to(buffer.device)))

    def update(
        self, layer: int, k: Tensor, v: Tensor, start: int | Tensor
    ) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` ([B, H_kv, T, D]) at ``start`` and return all keys/values so far.

        With ``start`` a 0-d tensor (the compiled decode step) the write is an ``index_copy_``
        and the whole buffer is returned, so every step has the same shapes; positions past the
        current one are then hidden by the attention mask.
        """
        keys, values = self._layer_keys[layer], self._layer_values[layer]
        t = k.shape[2]
        if isinstance(start, Tensor):
            index = start + torch.arange(t, device=k.device)
            keys.index_copy_(2, index, k)
            values.index_copy_(2, index, v)
            return keys, values
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        keys.narrow(2, start, t).copy_(k)
        values.narrow(2, start, t).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)
