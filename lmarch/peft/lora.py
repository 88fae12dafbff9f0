"""LoRA: low-rank adapters added to a model's ``nn.Linear`` layers from outside the model.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a layer's
weight W [out, in] and learns a low-rank change to it::

    y = x W^T + b + s * dropout(x) A^T B^T,   i.e.  W' = W + s B A,
    A [r, in] (Kaiming-uniform), B [out, r] (zeros, so training starts from the base model),
    s = alpha / r              (Hu et al.)
    s = alpha / sqrt(r)        (rsLoRA: Kalajdzievski 2023, "A Rank Stabilization Scaling
                                Factor for Fine-Tuning with LoRA")

A chosen layer is replaced by a :class:`LoRALinear`, a subclass of ``nn.Linear`` that keeps the
very same ``weight`` / ``bias`` Parameters, so the base model's state-dict keys do not change and
the adapter adds only ``<layer>.lora_A`` / ``<layer>.lora_B``. Being a subclass, its
``type(m) is nn.Linear`` is False: lmarch's fused native blocks (:mod:`lmarch.native.policy`)
leave it alone and run the reference forward.

A weight-only quantised layer of :mod:`lmarch.quant` (int8, int4, Q8_0, Q4_1, NF4) gets a
:class:`QuantLoRALinear` instead: the frozen quantised layer as ``base`` plus the same adapter
(its keys become ``<layer>.base.*``); float A and B train on top, as in QLoRA. Merging into a
quantised weight would requantise it, so it is refused.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.errors import LmarchError


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """s = alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank adapter: y = x W^T + b + s * dropout(x) A^T B^T.

    Built by :meth:`from_linear`, sharing the base layer's Parameters. While ``merged`` the
    product s B A is folded into ``weight`` and the forward is the plain linear one.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("build a LoRALinear with LoRALinear.from_linear(layer, ...)")

    @classmethod
    def from_linear(
        cls,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> LoRALinear:
        """A LoRA layer on ``base`` (its weight and bias are shared, not copied); A is
        Kaiming-uniform with a = sqrt(5) (``nn.Linear``'s and PEFT's choice), B is zero."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(base.training)
        return self

    def delta_weight(self) -> Tensor:
        """s B A [out, in]: the change the adapter makes to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """x W^T + b, plus s * dropout(x) A^T B^T unless merged."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # s scales B ([out, r]) rather than the output ([..., out]): fewer bytes moved per step
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B * self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A (in place); the forward is then a plain linear layer."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A: the base weight back, up to float rounding."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}"


def _quantised_types() -> tuple[type, ...]:
    from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear
    from lmarch.quant.int4 import Int4WeightOnlyLinear
    from lmarch.quant.int8 import Int8WeightOnlyLinear
    from lmarch.quant.nf4 import NF4Linear

    return (Int8WeightOnlyLinear, Int4WeightOnlyLinear, BlockQ4Linear, BlockQ8Linear, NF4Linear)


class QuantLoRALinear(nn.Module):
    """A frozen weight-only quantised layer plus a float adapter:
    y = base(x) + s * dropout(x) A^T B^T (Hu et al. 2021; s as in :func:`lora_scaling`)."""

    merged = False  # a quantised weight is never merged into

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)

    def forward(self, x: Tensor) -> Tensor:
        """base(x) + s * dropout(x) A^T B^T."""
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + F.linear(F.linear(self.lora_dropout(x), a), b * self.scaling)

    def merge(self) -> None:
        """Refused: folding s B A into a quantised weight would requantise (change) it."""
        raise LmarchError(
            "a LoRA on a quantised layer cannot be merged exactly",
            hint="save the adapter, or merge onto the float model",
        )

    def unmerge(self) -> None:
        """Nothing to do: a quantised layer's adapter is never merged."""


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def add_lora(
    model: nn.Module,
    targets: str | list[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose full module name (as in
    ``model.named_modules()``, e.g. ``blocks.0.attn.qkv``) matches ``targets`` by
    :func:`re.fullmatch` (a list: any of them) with a :class:`LoRALinear` (a quantised layer of
    :mod:`lmarch.quant`: with a :class:`QuantLoRALinear`); returns the names, in order. Refused:
    a pattern that is not a regular expression or matches no such layer, a rank outside
    1..min(in, out), a layer that already has an adapter, a weight tied to another layer. A
    block that :func:`lmarch.native.accelerate` swapped before takes the adapter too: its
    per-call check sees the wrapped layer and runs the reference forward. The model's code is
    not changed."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise LmarchError(
            f"LoRA target pattern {e.pattern!r} is not a regular expression ({e})"
        ) from None
    if rank < 1:
        raise LmarchError(f"LoRA rank must be at least 1, got {rank}")
    chosen: list[tuple[str, nn.Module]] = []
    layer_types = (nn.Linear, QuantLoRALinear, *_quantised_types())
    for name, module in model.named_modules():
        if isinstance(module, layer_types) and any(p.fullmatch(name) for p in compiled):
            if isinstance(module, (LoRALinear, QuantLoRALinear)):
                raise LmarchError(f"layer {name!r} already has a LoRA adapter")
            if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
                raise LmarchError(
                    f"layer {name!r} is a {type(module).__name__}; LoRA takes nn.Linear"
                )
            chosen.append((name, module))
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise LmarchError(
            f"LoRA target pattern {patterns} matches no Linear layer",
            hint=f"patterns are regular expressions over full names such as {linears[:3]}",
        )
    shared = _shared_weights(model)
    for name, layer in chosen:
        if isinstance(layer, nn.Linear) and id(layer.weight) in shared:
            # merging would also change the tied tensor (e.g. the embeddings under a tied head)
            raise LmarchError(
                f"layer {name!r} shares its weight with another layer; LoRA refuses it"
            )
        limit = min(layer.in_features, layer.out_features)
        if rank > limit:
            raise LmarchError(
                f"LoRA rank {rank} is larger than layer {name!r} allows (min(in, out) = {limit})"
            )
    for name, layer in chosen:
        if isinstance(layer, nn.Linear):
            lora: nn.Module = LoRALinear.from_linear(layer, rank, alpha, dropout, rslora)
        else:
            lora = QuantLoRALinear(layer, rank, alpha, dropout, rslora)
        _set_module(model, name, lora)
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | QuantLoRALinear]:
    """The model's LoRA layers (float and quantised bases) by module name."""
    kinds = (LoRALinear, QuantLoRALinear)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W <- W + s B A); refused, with nothing changed, when
    any adapted layer is quantised."""
    layers = lora_layers(model).values()
    for layer in layers:
        if isinstance(layer, QuantLoRALinear):
            layer.merge()  # raises
    for layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter back out of its weight (W <- W - s B A)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter but the adapters' A and B; returns how many parameters train.
    Refused on a model without adapters (nothing would train)."""
    layers = lora_layers(model)
    if not layers:
        raise LmarchError("the model has no LoRA adapters to train", hint="call add_lora first")
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for layer in layers.values():
        for p in (layer.lora_A, layer.lora_B):
            p.requires_grad_(True)
            n += p.numel()
    return n
