"""The process group of a distributed run: setup, teardown, who am I, and rank-0-only helpers.

lmarch runs on PyTorch's own distributed engine (``torch.distributed``): ``torchrun`` starts one
process per rank and hands each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_distributed` reads them and joins
the group over gloo (CPU) or NCCL (CUDA). Started without torchrun, a distributed strategy gets a
group of one process (rank 0 of 1), so the same code path runs, and a sharded checkpoint can be
read back, on a single process.

Only rank 0 speaks: it prints, draws the progress bar and writes ``metrics.jsonl`` and the
run folder; the other ranks stay silent (:func:`is_main`).
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "backend_for",
    "barrier",
    "device_for",
    "dist_info",
    "free_port",
    "init_distributed",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "rank_zero",
    "teardown",
]

# a collective that waits longer than this fails instead of hanging forever (a rank died)
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of ranks, its rank on this host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """Whether a process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """This process's rank and world size: from the live group, else from torchrun's variables,
    else rank 0 of 1."""
    if is_distributed():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    if launched_by_torchrun():
        env = os.environ
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return DistInfo()


def is_main() -> bool:
    """True on rank 0 (and in a plain single process)."""
    return dist_info().is_main


def device_for(name: str, info: DistInfo | None = None) -> torch.device:
    """The device of this rank: ``auto`` and ``cuda`` mean this rank's own GPU (``cuda:LOCAL_RANK``)
    when CUDA is present; ``cpu`` (or ``auto`` without CUDA) is the CPU."""
    info = info or dist_info()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it when one binds port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join (or start) the process group for ``device``'s backend; a no-op when one is up.

    Under torchrun the group is the launcher's (``env://`` rendezvous). Otherwise it is a group of
    one on a free local port, so a distributed strategy also runs, and reads its checkpoints, in
    a single process.
    """
    if is_distributed():
        return dist_info()
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched_by_torchrun():
        dist.init_process_group(backend_for(device), timeout=timeout)
    else:
        dist.init_process_group(
            backend_for(device),
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    return dist_info()


def teardown() -> None:
    """Leave the process group (if one is up), so the process exits cleanly. Objects that hold
    the group (a DDP wrapper's reducer) must be gone first: they are collected here."""
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the ranks (a copy; gloo has no AVG, so SUM / world size)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def rank_zero(log: Callable[..., object]) -> Callable[..., object]:
    """``log`` on rank 0; on the other ranks a function that says nothing."""
    if is_main():
        return log

    def silent(*args: object, **kwargs: object) -> None:
        return None

    return silent
