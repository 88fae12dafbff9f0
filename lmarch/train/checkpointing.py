"""Gradient (activation) checkpointing per Transformer block, applied to a built model.

Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost"): keep only each block's
input during the forward pass and recompute the block's inside during the backward pass. For
L blocks the activations kept fall from L x (everything a block saves) to L x (one [B, T, C]
input) + one block's worth, at the price of a second forward of every block.

:func:`checkpoint_blocks` does it from outside the model, like :func:`lmarch.native.accelerate`
and :func:`lmarch.peft.add_lora`: the model files do not change. Each block gets an instance
``forward`` that runs its class's forward under ``torch.utils.checkpoint`` (non-reentrant).
Why an instance attribute and not a subclass or a wrapper module:

- the block keeps its class, so the native policy (``type(m) is TransformerBlock``) still swaps
  the fused GPT-2 block in, whether :func:`accelerate` runs before or after this;
- the class's forward is looked up at call time, so a class swapped in later is the one recomputed;
- no wrapper module and no hook: state-dict keys, the optimizer's parameters and the native
  policy's hook checks are untouched.

The random state (dropout masks; the native block's seed is drawn from PyTorch's generator) is
saved at the forward and restored for the recomputation, so gradients equal those without
checkpointing. A call that builds no graph (``torch.no_grad``, evaluation) or writes a KV
cache (decoding: a recompute would write it twice) runs the block plainly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmarch.nn.block import TransformerBlock
from lmarch.nn.cross_attention import CrossAttentionBlock

__all__ = [
    "CHECKPOINTED_BLOCKS",
    "CheckpointedForward",
    "checkpoint_blocks",
    "checkpointed_blocks",
    "uncheckpoint_blocks",
]


class CheckpointedForward:
    """The ``forward`` :func:`checkpoint_blocks` gives one block: its class's forward run under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)``.

    A plain object (not a module), so it adds no parameters, keys or hooks; it holds the block,
    and ``copy.deepcopy`` of the model maps that reference to the copied block.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        block = self.block
        forward = type(block).forward  # looked up now: a class swapped in later is honoured
        if not torch.is_grad_enabled() or kwargs.get("cache") is not None:
            return forward(block, *args, **kwargs)
        return checkpoint(
            forward, block, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
        )


def _blocks(model: nn.Module, block_types: tuple[type, ...]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, block_types)]


CHECKPOINTED_BLOCKS: tuple[type, ...] = (TransformerBlock, CrossAttentionBlock)


def checkpoint_blocks(model: nn.Module, block_types: tuple[type, ...] = CHECKPOINTED_BLOCKS) -> int:
    """Checkpoint every block of ``model`` (instances of ``block_types``; subclasses such as the
    native GPT-2 block included), in place; return how many distinct blocks are checkpointed.

    Every family built from :class:`~lmarch.nn.block.TransformerBlock` (GPT, LLaMA, the BERT
    family) is covered, and the encoder-decoders' decoder layers
    (:class:`~lmarch.nn.cross_attention.CrossAttentionBlock`: T5, the Transformer, BART). ALBERT's shared block is one module applied at every layer: it counts
    once, and each of its applications is checkpointed separately. Calling it again changes
    nothing more.
    """
    blocks = _blocks(model, block_types)
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), CheckpointedForward):
            block.forward = CheckpointedForward(block)
    return len(blocks)


def checkpointed_blocks(model: nn.Module) -> int:
    """How many modules of ``model`` run under :func:`checkpoint_blocks`' forward."""
    return sum(isinstance(m.__dict__.get("forward"), CheckpointedForward) for m in model.modules())


def uncheckpoint_blocks(model: nn.Module) -> int:
    """Undo :func:`checkpoint_blocks` in place; return how many blocks were restored."""
    restored = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            del module.forward
            restored += 1
    return restored
