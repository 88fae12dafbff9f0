"""lmarch's own run folder: what ``lmarch train --out DIR`` writes and ``lmarch sample DIR`` reads.

    DIR/config.json              model config (with family), training config, preset, data spec
    DIR/tokenizer.json           the tokenizer (lmarch JSON)
    DIR/checkpoint/              the latest complete checkpoint, swapped in atomically:
        model.safetensors        weights (tied tensors stored once)
        trainer.safetensors      optimizer moments and random-generator states
        trainer.json             step, optimizer hyper-parameters, anything else JSON-shaped
    DIR/metrics.jsonl            one JSON object per log / eval
    DIR/loss.png                 the loss curves

A checkpoint is written to ``checkpoint.tmp/`` and then renamed into place (the previous one is
moved aside first and deleted last), so a run killed mid-save keeps its last good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.registry import build_model, config_from_dict
from lmarch.tokenizers.base import Tokenizer, load_tokenizer
from lmarch.weights.safetensors_io import atomic_write, load_into_model, load_tensors

CHECKPOINT = "checkpoint"


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file raises an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmarchError(f"file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc


def read_model_json(folder: str | Path, name: str, fmt: str, what: str, command: str) -> dict:
    """The JSON facts file ``name`` of a model folder that ``command`` writes, checked to say
    ``"format": fmt``: a missing file, or one of another format, is one error naming it."""
    path = Path(folder) / name
    if not path.is_file():
        raise LmarchError(
            f"no {what} in {folder} ({name} not found)",
            hint=f"give a folder written by '{command} --out'",
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise LmarchError(f"{path} is not an lmarch {what} ({fmt})")
    return meta


def write_checkpoint(run_dir: str | Path, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write a complete checkpoint: ``writers`` maps file names to functions writing them."""
    run_dir = Path(run_dir)
    tmp, final, old = (run_dir / f"{CHECKPOINT}{s}" for s in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, write in writers.items():
        write(tmp / name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint folder (or the previous one if a swap was cut short)."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (run_dir / name / "model.safetensors").is_file():
            return run_dir / name
    return None


def load_run(
    run_dir: str | Path, build: Callable[[dict[str, Any]], nn.Module] | None = None
) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Model (with its latest weights), tokenizer and run config of a training run folder.

    ``build(run_config)`` makes the module the checkpoint holds. Left out, the run's model
    config is built as it is, which is what a next-token (``clm``) run trains; a run of another
    objective (masked LM, replaced-token detection) is refused, since its checkpoint holds a
    head too: :func:`lmarch.load` reads every kind of run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmarchError(f"run folder not found: {run_dir}", hint="train one with 'lmarch train'")
    run_config = read_json(run_dir / "config.json")
    if not isinstance(run_config, dict) or "model" not in run_config:
        raise LmarchError(f"{run_dir / 'config.json'} is not an lmarch run config")
    if build is None:
        objective = run_config.get("objective", "clm")
        if objective != "clm":
            raise LmarchError(
                f"{run_dir} is a {objective} run; this reader builds next-token models",
                hint="load it with lmarch.load",
            )
        model = build_model(config_from_dict(run_config["model"]))
    else:
        model = build(run_config)
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        if any((run_dir / f"{CHECKPOINT}{s}" / "COMPLETE").is_file() for s in ("", ".old")):
            raise LmarchError(
                f"{run_dir} holds a sharded (fsdp) checkpoint, which single-process commands do "
                "not read",
                hint=f"run 'lmarch consolidate {run_dir} --out DIR' and use DIR",
            )
        raise LmarchError(f"{run_dir} has no checkpoint yet", hint="has training saved once?")
    load_into_model(model, load_tensors(ckpt / "model.safetensors"), source=str(ckpt))
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return model.eval(), tokenizer, run_config
