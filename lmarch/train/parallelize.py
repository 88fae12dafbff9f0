"""Distributed strategies applied to a built model from outside, as torchtitan's ``parallelize``.

The model files never change: :func:`parallelize` takes the module the registry built and
returns what to train.

- ``single``: the model as it is.
- ``ddp`` (data parallel; Li et al. 2020, "PyTorch Distributed"): every rank holds the whole
  model, runs its slice of the batch, and the gradients are averaged over ranks (all-reduce in
  buckets, overlapped with the backward) before each optimizer step, so the ranks stay equal.
- ``fsdp`` (fully sharded data parallel, FSDP2 ``fully_shard``; ZeRO-3 of Rajbhandari et al.
  2020): parameters, gradients and optimizer moments are sharded over the ranks (dim 0 of every
  tensor, as DTensors). Each Transformer block is its own unit -- its parameters are all-gathered
  just before its forward/backward and freed after, gradients reduce-scattered -- and the root
  holds what is left (embeddings, final norm, head). Per rank that is ~1/N of the parameter,
  gradient and optimizer bytes of the unsharded model. ``precision=bf16`` becomes FSDP's
  mixed-precision policy (bf16 parameters in compute, fp32 gradient reduction, fp32 master
  weights) instead of autocast.

Native fast paths (:func:`lmarch.native.accelerate`) are not swapped in under ``ddp`` or
``fsdp``: the fused blocks draw their own dropout seeds and hold buffers FSDP would have to
shard, so a distributed run trains the reference ``nn`` blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmarch.errors import LmarchError
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cross_attention import CrossAttentionBlock

__all__ = [
    "STRATEGIES",
    "ShardBytes",
    "check_strategy",
    "describe_memory",
    "gradient_sync",
    "parallelize",
    "shard_bytes",
    "unsharded_training_bytes",
]

STRATEGIES = ("single", "ddp", "fsdp", "tp")
SHARDED_BLOCKS: tuple[type, ...] = (TransformerBlock, CrossAttentionBlock)


def _outer_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of ``model`` that are not inside another block (FSDP units)."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, SHARDED_BLOCKS) and id(module) not in seen:
            blocks.append(module)
            seen.update(id(m) for m in module.modules())
    return blocks


def parallelize(
    model: nn.Module, strategy: str, device: torch.device, precision: str = "fp32"
) -> tuple[nn.Module, nn.Module]:
    """Apply ``strategy`` to ``model`` (already on ``device``, the process group already up).

    Returns ``(model, forward_model)``: the module that holds the weights (its ``state_dict``
    names are the model's own) and the module to call in training (the DDP wrapper, which
    averages gradients; the sharded model itself for FSDP). Every rank must have built the same
    initial weights (the same seed) before this call.
    """
    if strategy == "single":
        return model, model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return model, DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif precision == "fp16":
            policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        blocks = _outer_blocks(model)
        for i, block in enumerate(blocks):
            # the last block's parameters are needed at once by the backward: keep them gathered
            fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mp_policy=policy)
        return model, model
    check_strategy(strategy)
    raise AssertionError(f"strategy {strategy!r} passed its check but has no plan")


def check_strategy(strategy: str) -> None:
    """Refuse a strategy this build cannot apply -- before any rank waits for another, so every
    rank refuses alike and nothing hangs."""
    if strategy == "tp":
        raise LmarchError(
            "--strategy tp (tensor parallel) is not available yet",
            hint="use --strategy ddp or fsdp",
        )
    if strategy not in STRATEGIES:
        raise LmarchError(f"unknown strategy {strategy!r}", hint=f"one of {', '.join(STRATEGIES)}")


@contextlib.contextmanager
def gradient_sync(forward_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, the backward of ``forward_model`` averages gradients over ranks only when
    ``enabled``: gradient accumulation syncs on its last micro-batch alone (DDP's ``no_sync``;
    FSDP2's ``set_requires_gradient_sync``). A plain module ignores it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(forward_model, DistributedDataParallel) and not enabled:
        with forward_model.no_sync():
            yield
    elif isinstance(forward_model, FSDPModule):
        forward_model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            forward_model.set_requires_gradient_sync(True)
    else:
        yield


@dataclass
class ShardBytes:
    """Bytes this rank holds for training: parameters, gradients, optimizer state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.params + self.grads + self.optimizer


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def shard_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ShardBytes:
    """What this rank holds, counted from the local shards of DTensors (FSDP) or the whole
    tensors (single, DDP): parameters, the gradients present now, and the optimizer's tensors
    (AdamW: two moments per parameter; its step counters are scalars)."""
    params = list(dict.fromkeys(model.parameters()))
    p_bytes = sum(_local_bytes(p) for p in params)
    g_bytes = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    o_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            # AdamW's step counters are 0-d tensors (one per parameter): counted as scalars
            moments = [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
            o_bytes += sum(_local_bytes(v) for v in moments)
    return ShardBytes(p_bytes, g_bytes, o_bytes)


def unsharded_training_bytes(model: nn.Module) -> int:
    """Parameter + gradient + AdamW (two moments) bytes of the whole model in one process:
    4 x the parameter bytes (each tensor counted once, tied weights included)."""
    params = list(dict.fromkeys(model.parameters()))
    full = 0
    for p in params:
        numel = p.numel()  # a DTensor's numel is its global size
        full += numel * p.element_size()
    return 4 * full


def describe_memory(model: nn.Module, strategy: str, world_size: int) -> str:
    """One line on the training bytes this rank holds: its parameters (local shards under
    FSDP), as many gradient bytes, and AdamW's two fp32 moments, against one unsharded process."""
    mine = 4 * shard_bytes(model).params
    full = unsharded_training_bytes(model)
    return (
        f"{strategy} on {world_size} ranks: parameters + gradients + AdamW state "
        f"{mine / 2**20:.2f} MiB per rank ({mine / full:.0%} of {full / 2**20:.2f} MiB unsharded)"
    )
