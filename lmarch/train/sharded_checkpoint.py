"""Sharded checkpoints (torch.distributed.checkpoint) for FSDP runs: save, load on any number of
ranks, and convert into a single safetensors run folder.

Layout inside the run folder (the same ``checkpoint/`` name as a single-process run's)::

    DIR/checkpoint/
        dcp/                 torch.distributed.checkpoint files: one .distcp per rank + .metadata
        trainer.json         step, strategy, world size, loss-scaler state; "format": "dcp"
        trainer.safetensors  random-generator states (rank 0's) and the data order's position
        COMPLETE             written last: the checkpoint is whole

Every rank writes its own shards of the model and optimizer state (``get_state_dict`` gives
them under the model's own parameter names, so the wrapper does not show in the keys) into
``checkpoint.tmp/``; once all are done rank 0 writes the rest and swaps the folder in, keeping
the previous one until the swap is over, so a run killed mid-save keeps its last complete
checkpoint. The metadata records each tensor's global shape and where every shard lies, so
``set_state_dict`` after ``dcp.load`` reshards: a checkpoint written by 2 ranks loads on 1 (no
process group needed) or on 4, under FSDP, DDP or a single process.

:func:`consolidate_run` turns a run folder with a sharded checkpoint into a plain one
(``model.safetensors`` + optimizer state) that ``lmarch sample``, ``lmarch eval`` and a
single-process ``--resume`` read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.train.distributed import barrier, dist_info, is_distributed
from lmarch.weights.checkpoint import CHECKPOINT, read_json, write_checkpoint, write_json
from lmarch.weights.safetensors_io import load_tensors, save_tensors, unique_state_dict

__all__ = [
    "COMPLETE",
    "check_compatible",
    "consolidate_run",
    "find_sharded_checkpoint",
    "load_sharded",
    "save_sharded",
]

COMPLETE = "COMPLETE"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    # torch warns on every single-process save/load, which lmarch does on purpose
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def find_sharded_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete sharded checkpoint (or the previous one if a swap was cut
    short); None when the run has none."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (run_dir / name / COMPLETE).is_file():
            return run_dir / name
    return None


def save_sharded(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
) -> None:
    """Write model + optimizer shards of every rank, then (rank 0) ``meta`` as trainer.json and
    ``tensors`` as trainer.safetensors, and swap the checkpoint in. Every rank must call it."""
    run_dir = Path(run_dir)
    main = dist_info().is_main
    tmp, final, old = (run_dir / f"{CHECKPOINT}{s}" for s in (".tmp", "", ".old"))
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    import torch.distributed.checkpoint as dcp  # imported on use: ~0.5 s for every command
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save(
            {"model": model_sd, "optimizer": optim_sd},
            checkpoint_id=str(tmp / "dcp"),
            no_dist=not is_distributed(),
        )
    barrier()  # every rank's shards are on disk
    if main:
        write_json(tmp / "trainer.json", {**meta, "format": "dcp"})
        save_tensors(tensors, tmp / "trainer.safetensors")
        (tmp / COMPLETE).write_text("complete\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()  # nobody reads or writes the folder while rank 0 swaps it


def check_compatible(ckpt: str | Path, model: nn.Module) -> None:
    """Refuse, naming a tensor, a sharded checkpoint whose model tensors (names, global shapes)
    differ from ``model``'s -- before any rank starts loading, so every rank refuses alike."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    try:
        saved = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    except Exception as exc:  # a missing or damaged .metadata file
        raise LmarchError(f"cannot read the sharded checkpoint {ckpt}: {exc}") from exc
    shapes = {
        key[len("model.") :]: tuple(getattr(value, "size", ()))
        for key, value in saved.items()
        if key.startswith("model.")
    }
    mine = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(mine) - set(shapes))
    if missing:
        raise LmarchError(
            f"the checkpoint {ckpt} is from another model: it has no {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="resume a run with the model it was trained with",
        )
    for name, shape in mine.items():
        if shapes[name] != shape:
            raise LmarchError(
                f"the checkpoint {ckpt} is from another model: {name} is "
                f"{list(shapes[name])} there, {list(shape)} here",
                hint="resume a run with the model it was trained with",
            )


def load_sharded(
    ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` as this process holds them
    (FSDP shards, DDP replicas or a plain model; any number of ranks); return its trainer.json
    and trainer.safetensors. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = Path(ckpt)
    check_compatible(ckpt, model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with _single_process_quiet():  # without a group this process reads every shard it needs
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=not is_distributed())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    return read_json(ckpt / "trainer.json"), load_tensors(ckpt / "trainer.safetensors")


def consolidate_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir``: the run folder ``run_dir`` with its sharded checkpoint gathered into a
    single-process one (model.safetensors, optimizer moments, step, data position), which every
    single-process command loads and ``lmarch train --resume`` continues. Runs in one process;
    no process group is needed."""
    from lmarch.models.registry import build_model, config_from_dict
    from lmarch.train.config import TrainConfig
    from lmarch.train.objectives import objective_model
    from lmarch.train.optim import build_optimizer
    from lmarch.train.state import optimizer_to_tensors

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = find_sharded_checkpoint(run_dir)
    if ckpt is None:
        raise LmarchError(
            f"{run_dir} has no sharded checkpoint",
            hint="only runs trained with --strategy fsdp have one; others load as they are",
        )
    if out_dir.resolve() == run_dir.resolve():
        raise LmarchError("the consolidated run needs its own folder", hint="give another --out")
    config = read_json(run_dir / "config.json")
    model_cfg = config_from_dict(config["model"])
    objective = config.get("objective", "clm")
    model = build_model(model_cfg) if objective == "clm" else objective_model(objective, model_cfg)
    train = {**config["train"], "strategy": "single"}
    known = set(TrainConfig.__dataclass_fields__)
    train_cfg = TrainConfig(**{k: v for k, v in train.items() if k in known})
    optimizer = build_optimizer(model, train_cfg)
    meta, tensors = load_sharded(ckpt, model, optimizer)
    optim_tensors, optim_meta = optimizer_to_tensors(optimizer)
    single_meta = {"step": meta["step"], "optimizer": optim_meta}
    if "scaler" in meta:
        single_meta["scaler"] = meta["scaler"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "metrics.jsonl", "loss.png"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
    write_json(out_dir / "config.json", {**config, "train": train})
    return write_checkpoint(
        out_dir,
        {
            "model.safetensors": lambda p: save_tensors(unique_state_dict(model), p),
            "trainer.safetensors": lambda p: save_tensors({**optim_tensors, **tensors}, p),
            "trainer.json": lambda p: write_json(p, single_meta),
        },
    )
