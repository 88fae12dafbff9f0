"""Turning token streams into training batches for the causal-LM objective.

As in nanoGPT, a batch is B windows of ``block_size + 1`` tokens starting at uniformly random
offsets of the stream; inputs are the first ``block_size`` tokens of each window and targets the
last ``block_size`` (the same window shifted by one).
"""

from __future__ import annotations

import torch
from torch import Tensor


class RandomBlockSampler:
    """Random (inputs, targets) windows of a 1-D token tensor, reproducible and resumable.

    The sampler owns its random generator, so its position in the data order is part of its
    ``state_dict`` and a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, tokens: Tensor, block_size: int, batch_size: int, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D tensor")
        if len(tokens) <= block_size + 1:
            raise ValueError(
                f"the text has {len(tokens)} tokens, too few for blocks of {block_size}; "
                "use more text or a smaller block_size"
            )
        self.tokens = tokens.long()
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._window = torch.arange(block_size + 1)

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One batch ``(x, y)`` of shape [batch_size, block_size] each.

        With ``generator`` the batch is drawn from it instead, leaving the sampler's own order
        untouched (evaluation uses this).
        """
        g = generator or self.generator
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=g)
        windows = self.tokens[starts[:, None] + self._window]
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state: where this sampler is in its random order."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from a saved position."""
        self.generator.set_state(state["generator"])
