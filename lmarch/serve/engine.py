"""Batched decoding over a slotted key/value cache: many requests, one forward pass per step.

Continuous batching (Yu et al. 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models", iteration-level scheduling): requests join and leave the
batch between decode steps. Each active request owns one row ("slot") of a preallocated
:class:`~lmarch.nn.cache.KVCache` of ``n_slots`` rows; rows are kept packed (active requests
fill rows ``0 .. n-1``), so a step runs on views of the first ``n`` rows and copies nothing.

Rows sit at different positions, so a batched step needs, per row, its own position for the
position encoding, its own cache write position and its own attention mask (a row at position
p sees keys 0..p). The model's forward already takes an ``attention_mask``; the positions come
from two swaps made from outside for the duration of a step (the way lmarch swaps speed paths
in): the LLaMA family's ``rotary`` module and GPT's ``pos_emb`` table are replaced by modules
that read the per-row positions, and :class:`SlotCache` writes each row at its own position.
A model without either, or with sliding-window attention, decodes one request at a time
(through its own cached path, or by recomputing its window when it has no KV cache: RNNs,
the bigram, :class:`RecomputeEngine`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lmarch.nn.cache import KVCache
from lmarch.nn.position import LearnedPositionalEmbedding, RotaryEmbedding, apply_rotary


class SlotCache(KVCache):
    """A :class:`KVCache` of ``n_slots`` rows where row ``i`` writes at its own position.

    Before a batched step, :meth:`set_rows` names the ``n`` active rows' write positions; then
    ``update`` (called by every attention layer) stores row ``i``'s one new key at
    ``positions[i]`` and returns the first ``n`` rows up to the furthest position written.
    The ``start`` argument the model passes is ignored: the per-row positions replace it.
    """

    def __init__(self, base: KVCache) -> None:
        # adopt the buffers the model's own make_cache built (its dtype and head layout)
        self.keys, self.values, self.max_len = base.keys, base.values, base.max_len
        self._layer_keys = self.keys.unbind(0)
        self._layer_values = self.values.unbind(0)
        self._rows = torch.arange(self.keys.shape[1])
        self._positions = torch.zeros(0, dtype=torch.long)
        self._span = 0

    @property
    def n_slots(self) -> int:
        """How many requests the cache can hold at once."""
        return self.keys.shape[1]

    def set_rows(self, positions: Tensor) -> None:
        """The next step covers rows ``0 .. len(positions)-1``, row ``i`` writing at
        ``positions[i]``."""
        self._positions = positions
        self._span = int(positions.max()) + 1

    def update(
        self, layer: int, k: Tensor, v: Tensor, start: int | Tensor
    ) -> tuple[Tensor, Tensor]:
        """Write one new key/value per active row ([n, H_kv, 1, D]) at its own position and
        return rows ``0 .. n-1`` of this layer, positions ``0 .. span-1``."""
        n = k.shape[0]
        keys = self._layer_keys[layer].narrow(0, 0, n)
        values = self._layer_values[layer].narrow(0, 0, n)
        rows = self._rows[:n]
        # a float32 cache under half-precision weights (CPU, see KVCache.like) takes casts
        keys[rows, :, self._positions] = k[:, :, 0].to(keys.dtype)
        values[rows, :, self._positions] = v[:, :, 0].to(values.dtype)
        return keys.narrow(2, 0, self._span), values.narrow(2, 0, self._span)

    def row(self, index: int) -> KVCache:
        """A plain one-row :class:`KVCache` that is a view of row ``index`` (a prompt's prefill
        writes through it into this cache; a lone request decodes through it)."""
        view = KVCache.__new__(KVCache)
        view.keys = self.keys.narrow(1, index, 1)
        view.values = self.values.narrow(1, index, 1)
        view.max_len = self.max_len
        view._layer_keys = view.keys.unbind(0)
        view._layer_values = view.values.unbind(0)
        return view

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``source`` into row ``target`` (keeping
        the active rows packed when a request leaves)."""
        for buffer in (self.keys, self.values):
            buffer[:, target, :, :length].copy_(buffer[:, source, :, :length])


class _RowRotary(nn.Module):
    """RoPE at per-row positions: row ``b`` of q and k ([B, H, 1, D]) is rotated by the angles of
    ``positions[b]`` (Su et al. 2021), from the wrapped module's own tables."""

    def __init__(self, rotary: RotaryEmbedding, positions: Tensor) -> None:
        super().__init__()
        self.inner = rotary
        self.positions = positions
        self._angles: tuple[Tensor, Tensor] | None = None

    def forward(self, q: Tensor, k: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        if self._angles is None or self._angles[0].dtype != q.dtype:
            # looked up once per step, shared by every layer
            cos = self.inner.cos.index_select(0, self.positions)[:, None, None, :]
            sin = self.inner.sin.index_select(0, self.positions)[:, None, None, :]
            self._angles = (cos.to(q.dtype), sin.to(q.dtype))
        cos, sin = self._angles
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class _RowPositions(nn.Module):
    """GPT's learned position table looked up at per-row positions: [B, 1, dim]."""

    def __init__(self, table: LearnedPositionalEmbedding, positions: Tensor) -> None:
        super().__init__()
        self.inner = table
        self.positions = positions

    def forward(self, positions: Tensor) -> Tensor:
        return self.inner(self.positions)[:, None, :]


def position_hook(model: nn.Module) -> str | None:
    """Which per-row position swap ``model`` takes: ``"rotary"`` (a ``rotary`` attribute that
    is a plain :class:`RotaryEmbedding`), ``"pos_emb"`` (a learned table), or None."""
    if type(getattr(model, "rotary", None)) is RotaryEmbedding:
        return "rotary"
    if isinstance(getattr(model, "pos_emb", None), LearnedPositionalEmbedding):
        return "pos_emb"
    return None


@contextmanager
def row_positions(model: nn.Module, positions: Tensor) -> Iterator[None]:
    """Within the block, ``model`` encodes row ``b`` of its input at ``positions[b]``."""
    hook = position_hook(model)
    if hook is None:
        raise ValueError(f"{type(model).__name__} has no position module to swap")
    original = getattr(model, hook)
    wrapper = _RowRotary if hook == "rotary" else _RowPositions
    setattr(model, hook, wrapper(original, positions))
    try:
        yield
    finally:
        setattr(model, hook, original)


def batchable(model: nn.Module) -> bool:
    """Whether ``model`` can decode rows at different positions in one pass: it has a position
    module :func:`row_positions` can swap, and no attention whose mask depends on the position
    in a way the per-row mask here does not cover (sliding windows; a second rotary module for
    local layers, as Gemma 3 has)."""
    if position_hook(model) is None or getattr(model, "rotary_local", None) is not None:
        return False
    return not any(getattr(m, "sliding_window", None) for m in model.modules())


def _builds_kv_cache(model: nn.Module) -> bool:
    make = getattr(model, "make_cache", None)
    return make is not None and isinstance(make(1, 1), KVCache)


class SlotEngine:
    """Forward passes of a causal LM over a :class:`SlotCache` of ``n_slots`` rows, each up to
    ``context`` positions. Counts its calls: ``prefill_calls``, ``decode_calls`` (batched steps)
    and ``decode_rows`` (rows those steps carried)."""

    def __init__(self, model: nn.Module, n_slots: int, context: int) -> None:
        self.model = model
        self.context = context
        self.cache = SlotCache(model.make_cache(n_slots, context))
        self._row_views = [self.cache.row(i) for i in range(n_slots)]
        self.prefill_calls = self.decode_calls = self.decode_rows = 0

    @property
    def n_slots(self) -> int:
        """The most requests decoded together."""
        return self.cache.n_slots

    @torch.no_grad()
    def prefill(self, row: int, ids: list[int]) -> Tensor:
        """Run prompt ``ids`` into row ``row`` (positions 0 .. len-1); the logits [V] of the
        token after it."""
        self.prefill_calls += 1
        x = torch.tensor([ids], dtype=torch.long)
        return self.model(x, cache=self._row_views[row], start=0, last_only=True)[0, -1]

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """Feed token ``tokens[i]`` at ``positions[i]`` to row ``i`` for the first
        ``len(tokens)`` rows, in one forward pass; the next-token logits [n, V].

        Every layer but attention gives each row bit for bit what single decoding gives it
        (int4/int8 kernels included: their rows do not depend on the batch). Attention runs
        over the longest row's keys under a mask, so its float32 sums are taken in another
        order than over a row's own keys; rounded to bfloat16 that can move a value by one
        step, and greedy choices on near-ties may differ (tests/serve/test_int4_batching.py).
        """
        self.decode_calls += 1
        self.decode_rows += len(tokens)
        n = len(tokens)
        if n == 1:  # the model's own single-sequence path (native decode kernels apply)
            x = torch.tensor([tokens], dtype=torch.long)
            return self.model(x, cache=self._row_views[0], start=positions[0])[:, -1]
        x = torch.tensor(tokens, dtype=torch.long)[:, None]
        where = torch.tensor(positions, dtype=torch.long)
        self.cache.set_rows(where)
        span = int(where.max()) + 1
        mask = (torch.arange(span)[None, :] <= where[:, None])[:, None, None, :]
        with row_positions(self.model, where):
            logits = self.model(x, cache=self.cache, start=0, attention_mask=mask)
        return logits[:, -1]

    def move_row(self, source: int, target: int, length: int) -> None:
        """See :meth:`SlotCache.move_row`."""
        self.cache.move_row(source, target, length)


class RecomputeEngine:
    """One request at a time for models without a per-row position hook (RNNs, the bigram):
    every step reruns the last ``context`` tokens (nanoGPT's ``generate`` without a cache)."""

    def __init__(self, model: nn.Module, context: int) -> None:
        self.model = model
        self.context = context
        self.ids: list[int] = []
        self.prefill_calls = self.decode_calls = self.decode_rows = 0

    @property
    def n_slots(self) -> int:
        """Always one."""
        return 1

    @torch.no_grad()
    def prefill(self, row: int, ids: list[int]) -> Tensor:
        """Remember ``ids`` and return the next-token logits [V]."""
        self.prefill_calls += 1
        self.ids = list(ids)
        return self._logits()

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """Append the one row's token and return its next-token logits [1, V]."""
        self.decode_calls += 1
        self.decode_rows += 1
        self.ids.append(tokens[0])
        return self._logits()[None]

    def _logits(self) -> Tensor:
        x = torch.tensor([self.ids[-self.context :]], dtype=torch.long)
        return self.model(x)[0, -1]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Nothing to move: one row."""


def make_engine(model: nn.Module, max_batch: int, context: int) -> SlotEngine | RecomputeEngine:
    """A :class:`SlotEngine` of ``max_batch`` rows when ``model`` is :func:`batchable`; one
    of a single row (the model's own cached decoding, one request at a time) when it builds a
    :class:`KVCache` but is not; else a :class:`RecomputeEngine`."""
    model.eval()
    if not _builds_kv_cache(model):
        return RecomputeEngine(model, context)
    return SlotEngine(model, max_batch if batchable(model) else 1, context)


__all__ = [
    "RecomputeEngine",
    "SlotCache",
    "SlotEngine",
    "batchable",
    "make_engine",
    "position_hook",
    "row_positions",
]
