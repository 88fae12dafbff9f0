"""Save what :func:`lmarch.load` returned as a run folder that :func:`lmarch.load` reads back
with the same conventions (chat template, stop tokens, BOS), whatever the model came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from lmarch.errors import LmarchError
from lmarch.loading.model import ChatConvention, LoadedModel
from lmarch.models.heads import RUN_OBJECTIVES
from lmarch.models.registry import config_to_dict
from lmarch.weights.model_folder import write_model_folder

__all__ = ["chat_from_config", "save_loaded"]

_RUN_OBJECTIVE_OF = {objective: name for name, objective in RUN_OBJECTIVES.items()}


def save_loaded(
    loaded: LoadedModel,
    out: str | Path,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``loaded`` to ``out`` (:func:`lmarch.weights.model_folder.write_model_folder`).

    ``extra`` entries go into ``config.json`` beside ``model``, ``objective``, ``chat`` and
    ``source`` (``quant`` and ``finetune`` are the ones lmarch reads back); ``tensors``
    replaces the model's own state dict (an adapter-free or merged copy, say). Only the
    models a training run can hold are written: causal LMs, masked LMs and ELECTRA
    discriminators; a classifier run keeps its own folder layout."""
    objective = _RUN_OBJECTIVE_OF.get(loaded.objective)
    config = getattr(loaded.model, "config", None)
    if objective is None or config is None:
        raise LmarchError(
            f"{loaded.name} holds {loaded.describe()}; only language models can be saved this way"
        )
    run_config: dict[str, Any] = {
        "model": config_to_dict(config),
        "objective": objective,
        "chat": dataclasses.asdict(loaded.chat),
        "source": loaded.name,
        **(extra or {}),
    }
    return write_model_folder(out, loaded.model, loaded.tokenizer, run_config, tensors)


def chat_from_config(run_config: dict[str, Any]) -> ChatConvention:
    """The chat convention a run folder's ``config.json`` stores (none: a plain model)."""
    chat = run_config.get("chat")
    if not chat:
        return ChatConvention()
    try:
        return ChatConvention(
            template=chat.get("template"),
            stop_token_ids=tuple(int(i) for i in chat.get("stop_token_ids", ())),
            bos_token_id=None if chat.get("bos_token_id") is None else int(chat["bos_token_id"]),
            add_bos=bool(chat.get("add_bos", False)),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise LmarchError(f"the run config's 'chat' entry is damaged: {exc}") from exc
