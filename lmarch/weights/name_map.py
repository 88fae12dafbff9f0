"""Renaming state dicts between lmarch's layout and another project's (one map per family).

A map is a list of rules ``ours <-> theirs`` in which ``{i}`` stands for the layer index, plus an
optional transform per rule (e.g. GPT-2's Conv1D stores weights transposed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from lmarch.errors import LmarchError


@dataclass(frozen=True)
class Rule:
    """``ours`` and ``theirs`` are tensor names; ``{i}`` is a layer index. ``transpose`` swaps
    the two dims of a matrix on the way across (its own inverse)."""

    ours: str
    theirs: str
    transpose: bool = False


class WeightMap:
    """Converts a state dict in either direction according to a list of :class:`Rule`.

    ``ignore`` lists regular expressions for names on their side that carry no weights
    (e.g. cached attention-mask buffers) and are dropped silently.
    """

    def __init__(self, rules: Iterable[Rule], ignore: Iterable[str] = ()) -> None:
        self.rules = list(rules)
        self.ignore = [re.compile(p) for p in ignore]

    def _expanded(self, n_layers: int) -> list[Rule]:
        out = []
        for r in self.rules:
            if "{i}" in r.ours:
                out += [
                    Rule(r.ours.format(i=i), r.theirs.format(i=i), r.transpose)
                    for i in range(n_layers)
                ]
            else:
                out.append(r)
        return out

    def _convert(
        self, source: dict[str, Tensor], n_layers: int, to_ours: bool, where: str
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        for r in self._expanded(n_layers):
            src, dst = (r.theirs, r.ours) if to_ours else (r.ours, r.theirs)
            if src not in source:
                raise LmarchError(f"{where}: tensor {src!r} is missing")
            t = source[src]
            out[dst] = t.t().contiguous() if r.transpose else t
            used.add(src)
        if to_ours:
            extra = [
                k for k in source if k not in used and not any(p.search(k) for p in self.ignore)
            ]
            if extra:
                raise LmarchError(f"{where}: unexpected tensors {extra[:5]}")
        return out

    def to_ours(self, theirs: dict[str, Tensor], n_layers: int, where: str = "checkpoint"):
        """Their names -> ours. Unknown names (not ignored) are an error."""
        return self._convert(theirs, n_layers, to_ours=True, where=where)

    def to_theirs(self, ours: dict[str, Tensor], n_layers: int, where: str = "model"):
        """Our names -> theirs."""
        return self._convert(ours, n_layers, to_ours=False, where=where)
