"""One way to load a model: :func:`load` takes a preset with shipped weights, a ``.gguf``
file, a Hugging Face folder or an lmarch run folder (image-text ones too: CLIP, the captioner,
Flamingo) and returns a :class:`LoadedModel`.

    import lmarch
    loaded = lmarch.load("smollm2-135m")          # the GGUF's own Q4 blocks, native kernels
    loaded = lmarch.load("runs/mlm")              # the masked LM that run trained
    loaded.require("causal-lm", "generate")       # one clear error if it is not one

Layers: resolving and reading files is :mod:`lmarch.loading.sources` (over
:mod:`lmarch.weights`), choosing and applying quantisation :mod:`lmarch.loading.speed` (over
:mod:`lmarch.quant` and :mod:`lmarch.native`), reading image-text models
:mod:`lmarch.loading.vision`; which head a model gets is :mod:`lmarch.models.heads`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmarch.errors import LmarchError
from lmarch.loading.model import (
    CAPTION,
    CONTRASTIVE,
    FLAMINGO,
    ChatConvention,
    LoadedModel,
    Pooling,
)
from lmarch.loading.sources import (
    read_classifier,
    read_gguf,
    read_hf,
    read_run,
    resolve,
)
from lmarch.loading.speed import (
    QUANT_CHOICES,
    accept_stored_quant,
    choose_quant,
    quantize_and_accelerate,
)

DEFAULT_CONTEXT = 8192  # tokens of KV cache a GGUF model is built for (its own limit if less)


def check_vocabulary(loaded: LoadedModel) -> None:
    """Refuse a tokenizer whose ids go past the model's embedding table (one line naming both
    sizes) instead of an index error deep inside the model."""
    config = getattr(loaded.model, "config", None)
    model_vocab = getattr(config, "vocab_size", None)
    tokens = getattr(loaded.tokenizer, "vocab_size", None)
    if isinstance(model_vocab, int) and isinstance(tokens, int) and tokens > model_vocab:
        raise LmarchError(
            f"{loaded.name}: the tokenizer has {tokens} ids but the model's vocabulary holds "
            f"only {model_vocab}",
            hint="the tokenizer does not belong to this model",
        )


def load(
    spec: str | Path,
    *,
    quant: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    context: int = DEFAULT_CONTEXT,
) -> LoadedModel:
    """Load ``spec``: a preset with shipped weights, a ``.gguf`` file, a Hugging Face folder,
    an ``lmarch train`` run folder, an ``lmarch classify train`` folder, or an image-text
    model (a ``lmarch clip|caption|flamingo train`` run, a Hugging Face CLIP folder:
    :mod:`lmarch.loading.vision`, float only, with its image ``preprocessor``).

    ``quant``: ``"auto"`` (the fastest exact path: a GGUF's own Q4 or Q8 blocks on the native
    kernels when it has them, else float), ``"none"`` (float32), ``"q4"`` / ``"q8"``
    (llama.cpp's block formats on lmarch's native kernels), ``"int4"`` / ``"int8"``
    (PyTorch's weight-only kernels, bfloat16 activations). ``dtype`` casts a float model
    (and makes ``auto`` choose float); ``device`` moves it; ``context`` caps the KV cache a
    GGUF model is built for. Run folders load the model their objective trained; check it
    with :meth:`LoadedModel.require`. A folder ``lmarch quantize`` wrote loads with the
    quantised layers it stores (``quant`` "auto", "none" or that method).
    """
    start = time.perf_counter()
    source = resolve(spec)
    if source.kind == "finetuned":  # base + adapter: the base is loaded by this same function
        from lmarch.loading.finetuned import read_finetuned

        return read_finetuned(source, quant, device, dtype, context)
    if source.kind in ("run", "hf"):
        from lmarch.loading.vision import read_vision, vision_objective

        objective = vision_objective(source)
        if objective is not None:
            loaded = read_vision(source, objective)
            if quant not in ("auto", "none"):
                raise LmarchError(
                    f"{loaded.name} holds {loaded.describe()}: it loads in float (quant none), "
                    f"not {quant}"
                )
            check_vocabulary(loaded)
            return _place(loaded, device, dtype, start)
    chosen = choose_quant(quant, source.kind, source.path, device, dtype)
    if dtype is not None and chosen != "none":
        raise LmarchError(f"dtype {dtype} is for float models, not quant {chosen!r}")
    if source.kind == "gguf":
        loaded = read_gguf(source, context, chosen if chosen != "int8" else "none")
    elif source.kind == "hf":
        loaded = read_hf(source)
    elif source.kind == "run":
        loaded = read_run(source)
    else:
        loaded = read_classifier(source)
    check_vocabulary(loaded)
    if source.kind == "run" and loaded.quant != "none":  # written by lmarch quantize
        chosen = accept_stored_quant(loaded.name, loaded.quant, quant)
    quantize_and_accelerate(loaded.model, loaded.quant, chosen)
    loaded.quant = chosen
    return _place(loaded, device, dtype, start)


def _place(
    loaded: LoadedModel, device: str, dtype: torch.dtype | None, start: float
) -> LoadedModel:
    if dtype is not None:
        loaded.model.to(dtype)
    if device != "cpu":
        loaded.model.to(device)
    loaded.load_s = time.perf_counter() - start
    return loaded


__all__ = [
    "CAPTION",
    "CONTRASTIVE",
    "DEFAULT_CONTEXT",
    "FLAMINGO",
    "QUANT_CHOICES",
    "ChatConvention",
    "LoadedModel",
    "Pooling",
    "check_vocabulary",
    "load",
]
