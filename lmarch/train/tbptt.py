"""Truncated back-propagation through time with carried state (Williams & Peng 1990; the way
Zaremba et al. 2014 and char-rnn train recurrent LMs).

A recurrent model reads B contiguous streams of text (:class:`lmarch.data.batches.StreamSampler`)
one window of ``block_size`` tokens at a time. The state it ends a window with is where it
starts the next, so what it learns is not cut off at window borders; the gradient, however,
stops there: the state is detached between windows, so each backward pass costs one window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.nn.recurrent import RecurrentState


class CarriedStateLoss:
    """The next-token cross-entropy of a recurrent LM over a ``(x, y, fresh)`` batch, starting
    each row from the state its stream ended the previous batch with (zeros where ``fresh``)
    and keeping the new final state, detached, for the next call.

    Training batches and evaluation batches (the Trainer scores those under ``no_grad``) keep
    separate states, so a validation stream never runs on into training. The model must offer
    ``make_cache(batch_size)`` and take ``cache=`` (:class:`lmarch.models.rnn.RecurrentLM`).
    """

    def __init__(self) -> None:
        self.states: dict[bool, RecurrentState] = {}

    def reset(self) -> None:
        """Forget the carried states (the next batches start from zeros)."""
        self.states.clear()

    def state_for(self, model: nn.Module, fresh: Tensor, training: bool) -> RecurrentState:
        """The state the next batch starts from, with the ``fresh`` rows zeroed."""
        state = self.states.get(training)
        if state is None or state.batch_size != len(fresh):
            state = model.make_cache(len(fresh))
        return state.reset_(fresh)

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        """Mean -log p(y | x, carried state) over the batch."""
        inputs, targets, fresh = batch
        training = torch.is_grad_enabled()
        state = self.state_for(model, fresh, training)
        logits = model(inputs, cache=state)
        self.states[training] = state.detach_()
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


__all__ = ["CarriedStateLoss"]
