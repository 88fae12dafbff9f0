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


class StreamSampler:
    """B contiguous streams through a 1-D token tensor, for truncated back-propagation through
    time: row b of the k-th batch is the k-th window of ``block_size`` tokens of stream b, so a
    recurrent model can carry its state from one batch into the next.

    The text is cut into ``batch_size`` equal streams (row b reads from b * L on, L = the
    stream length), and each pass over them starts at a random shift in [0, block_size) drawn
    from the sampler's generator, so that window borders move from one pass to the next. A
    batch is ``(x, y, fresh)``: inputs and targets [B, block_size] as
    :class:`RandomBlockSampler` gives, and ``fresh`` [B] (bool), True for a row whose state must
    start from zero. That is every row of the first batch, of the first after a pass wrapped
    around, and of the first after an evaluation drew from this sampler (the carried state is
    reset after evaluation). ``position_tensors`` / ``load_position_tensors`` save and restore
    where the walk is (the Trainer checkpoints them next to the generator).

    With ``generator`` (evaluation), ``sample`` walks a separate set of streams that start at
    random offsets drawn from that generator: successive calls with the same generator object
    continue them (``fresh`` False), a new generator starts new ones.
    """

    def __init__(self, tokens: Tensor, block_size: int, batch_size: int, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D tensor")
        stream = (len(tokens) - 1) // batch_size
        if stream < 2 * block_size:
            raise ValueError(
                f"the text has {len(tokens)} tokens, too few for {batch_size} streams of at "
                f"least two windows of {block_size}; use more text, a smaller batch_size or a "
                "smaller block_size"
            )
        self.tokens = tokens.long()
        self.block_size = block_size
        self.batch_size = batch_size
        self.stream_length = stream
        self.generator = torch.Generator().manual_seed(seed)
        self._bases = torch.arange(batch_size) * stream
        self._window = torch.arange(block_size + 1)
        self.shift = 0
        self.step = 0  # windows read in this pass
        self._fresh = True
        self._new_pass()
        self._eval: tuple[torch.Generator, Tensor] | None = None

    def _new_pass(self) -> None:
        self.shift = int(torch.randint(self.block_size, (1,), generator=self.generator))
        self.step = 0

    def _windows(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        windows = self.tokens[starts[:, None] + self._window]
        return windows[:, :-1], windows[:, 1:]

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One batch ``(x, y, fresh)``; see the class docstring."""
        if generator is not None:
            return self._sample_eval(generator)
        if self.shift + (self.step + 1) * self.block_size > self.stream_length:
            self._new_pass()
            self._fresh = True
        starts = self._bases + self.shift + self.step * self.block_size
        self.step += 1
        fresh = torch.full((self.batch_size,), self._fresh)
        self._fresh = False
        return (*self._windows(starts), fresh)

    def _sample_eval(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        self._fresh = True  # training's carried state starts afresh after an evaluation
        last = len(self.tokens) - self.block_size - 1  # the last start with a whole window
        if self._eval is None or self._eval[0] is not generator:
            starts = torch.randint(last + 1, (self.batch_size,), generator=generator)
            fresh = torch.ones(self.batch_size, dtype=torch.bool)
        else:
            starts = self._eval[1] + self.block_size
            fresh = starts > last
            redraw = torch.randint(last + 1, (self.batch_size,), generator=generator)
            starts = torch.where(fresh, redraw, starts)
        self._eval = (generator, starts)
        return (*self._windows(starts), fresh)

    def position_tensors(self) -> dict[str, Tensor]:
        """Where the training walk is: its pass's shift and the windows read in it."""
        return {"stream_position": torch.tensor([self.shift, self.step], dtype=torch.long)}

    def load_position_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Continue the walk :meth:`position_tensors` saved; the first batch is fresh (the
        carried state is not checkpointed)."""
        self.shift, self.step = (int(v) for v in tensors["stream_position"])
        self._fresh = True
        self._eval = None


class RankSlice:
    """One rank's share of another sampler's batches, for data-parallel training.

    Every rank's sampler draws the same global batch of B rows from the same seeded generator,
    and this wrapper keeps the contiguous rows ``[r * B/N, (r + 1) * B/N)`` of rank r of N: the
    ranks never overlap, together they see exactly the batch one process would, and the data
    order (the generator, the stream position) stays the same on every rank, so checkpoints
    and resume work as in one process. Attributes other than ``sample`` (``batch_size`` -- the
    global B --, ``block_size``, ``generator``, position state) are the wrapped sampler's.
    """

    def __init__(self, sampler, rank: int, world_size: int) -> None:
        batch = int(sampler.batch_size)
        if batch % world_size:
            raise ValueError(
                f"batch_size {batch} is not divisible by the {world_size} ranks; each rank "
                "takes an equal slice of the global batch"
            )
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch // world_size

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """This rank's rows of the wrapped sampler's next global batch."""
        batch = self.sampler.sample(generator=generator)
        lo = self.rank * self.local_batch_size
        return tuple(t[lo : lo + self.local_batch_size] for t in batch)

    def __getattr__(self, name: str):
        # only called for names not found on the wrapper itself
        if "sampler" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["sampler"], name)
