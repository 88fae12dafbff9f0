"""Renaming state dicts between lmarch's layout and another project's (one map per family).

A map is a list of rules ``ours <-> theirs`` in which ``{i}`` stands for the layer index. A rule
may transpose a matrix (GPT-2's Conv1D stores W as [in, out]), fuse several of their tensors into
one of ours by concatenating rows (separate q/k/v projections -> our fused ``qkv``), and apply a
per-part transform (llama.cpp's row permutation of Q and K).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lmarch.errors import LmarchError

PartFn = Callable[[Tensor], Tensor] | None


@dataclass(frozen=True)
class Rule:
    """One tensor of ours and the tensor(s) of theirs it corresponds to.

    ``theirs`` is a name or, for a fused tensor, a tuple of names whose rows are concatenated
    in order. ``load_fns`` / ``save_fns`` (one per part, or None) transform each part on the way
    in / out; they must be inverses of each other. ``transpose`` swaps the two dims of each part.
    """

    ours: str
    theirs: str | tuple[str, ...]
    transpose: bool = False
    load_fns: tuple[PartFn, ...] | None = None
    save_fns: tuple[PartFn, ...] | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        return self.theirs if isinstance(self.theirs, tuple) else (self.theirs,)

    def at_layer(self, i: int) -> Rule:
        """This rule with ``{i}`` replaced by layer index ``i``."""
        theirs = tuple(t.format(i=i) for t in self.parts)
        return Rule(
            self.ours.format(i=i),
            theirs if isinstance(self.theirs, tuple) else theirs[0],
            self.transpose,
            self.load_fns,
            self.save_fns,
        )


def _apply(t: Tensor, fn: PartFn, transpose: bool, before: bool) -> Tensor:
    if transpose and before:
        t = t.t()
    if fn is not None:
        t = fn(t)
    if transpose and not before:
        t = t.t()
    return t.contiguous() if transpose else t


class WeightMap:
    """Converts a state dict in either direction according to a list of :class:`Rule`.

    ``ignore`` lists regular expressions for names on their side that carry no weights
    (e.g. cached attention-mask buffers, an output head tied to the embeddings) and are dropped.
    """

    def __init__(self, rules: Iterable[Rule], ignore: Iterable[str] = ()) -> None:
        self.rules = list(rules)
        self.ignore = [re.compile(p) for p in ignore]

    def _expanded(self, n_layers: int) -> list[Rule]:
        return list(self._iter_expanded(n_layers))

    def _iter_expanded(self, n_layers: int) -> Iterator[Rule]:
        """The rules with ``{i}`` replaced by each layer index, made one at a time (a config
        claiming a million layers fails at the first missing tensor, not after a million)."""
        for r in self.rules:
            if "{i}" in r.ours:
                yield from (r.at_layer(i) for i in range(n_layers))
            else:
                yield r

    def to_ours(
        self, theirs: dict[str, Tensor], n_layers: int, where: str = "checkpoint"
    ) -> dict[str, Tensor]:
        """Their names -> ours. Missing tensors and unknown (not ignored) ones are errors."""
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        for r in self._iter_expanded(n_layers):
            pieces = []
            for k, name in enumerate(r.parts):
                if name not in theirs:
                    raise LmarchError(f"{where}: tensor {name!r} is missing")
                fn = r.load_fns[k] if r.load_fns else None
                pieces.append(_apply(theirs[name], fn, r.transpose, before=True))
                used.add(name)
            out[r.ours] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        extra = [k for k in theirs if k not in used and not any(p.search(k) for p in self.ignore)]
        if extra:
            raise LmarchError(f"{where}: unexpected tensors {extra[:5]}")
        return out

    def to_theirs(
        self,
        ours: dict[str, Tensor],
        n_layers: int,
        where: str = "model",
        split_sizes: dict[str, tuple[int, ...]] | None = None,
    ) -> dict[str, Tensor]:
        """Our names -> theirs. A fused tensor is cut into its parts by ``split_sizes[ours]``
        (or into equal parts when not given)."""
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        for r in self._expanded(n_layers):
            if r.ours not in ours:
                raise LmarchError(f"{where}: tensor {r.ours!r} is missing")
            used.add(r.ours)
            generic = re.sub(r"\.\d+\.", ".{i}.", r.ours)
            sizes = (split_sizes or {}).get(generic)
            t = ours[r.ours]
            parts = t.split(list(sizes), dim=0) if sizes else t.chunk(len(r.parts), dim=0)
            for k, (name, part) in enumerate(zip(r.parts, parts)):
                fn = r.save_fns[k] if r.save_fns else None
                out[name] = _apply(part, fn, r.transpose, before=False)
        extra = [k for k in ours if k not in used]
        if extra:
            raise LmarchError(f"{where}: tensors with no counterpart {extra[:5]}")
        return out
