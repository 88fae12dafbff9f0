"""Reading a LoRA / QLoRA fine-tuning run folder (``lmarch finetune --method lora|qlora``) as
the fine-tuned model: its base, loaded from where ``config.json`` says it lies, plus the adapter
the folder keeps in PEFT's format (:func:`lmarch.peft.load_adapter`).

    DIR/config.json      "model" (the base's config), "chat", "train", "finetune": {"base": the
                         base's spec (a preset name, or an absolute path), "method", "rank",
                         "alpha", "targets", "layers", "base_fingerprint", ...}
    DIR/adapter_config.json, DIR/adapter_model.safetensors   the adapter (PEFT's format)
    DIR/tokenizer.json   the base's tokenizer
    DIR/checkpoint/      the trainer's state for --resume (adapter tensors, optimizer, RNG)

Before the adapter is added, the base is checked against the one it was trained on: the same
model config (shapes, vocabulary, positions) and the same embedding weights (a SHA-256 of them,
:func:`base_fingerprint`), so an adapter is never silently applied to another model. A QLoRA
run's base is quantised to NF4 as it was for training (the quantisation is deterministic, so the
model is the one that trained); ``quant="none"`` gives its dequantised weights in float32 instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmarch.errors import LmarchError
from lmarch.loading.model import LoadedModel
from lmarch.loading.sources import Source
from lmarch.models.heads import CAUSAL_LM
from lmarch.models.registry import PRESETS, config_to_dict

__all__ = [
    "ADAPTER_METHODS",
    "METHODS",
    "base_fingerprint",
    "base_reference",
    "dequantize_nf4_layers",
    "is_adapter_run",
    "qlora_skip",
    "quantize_base_nf4",
    "read_finetuned",
]

METHODS = ("full", "lora", "qlora")
ADAPTER_METHODS = ("lora", "qlora")  # runs that keep an adapter, not the whole model
# model-config fields that do not change the weights: the context a GGUF is built for, dropout,
# the attention implementation
_FREE_FIELDS = ("block_size", "dropout", "attention")


def is_adapter_run(run_config: Any) -> bool:
    """Whether a run folder's ``config.json`` describes a LoRA / QLoRA fine-tuning run."""
    info = run_config.get("finetune") if isinstance(run_config, dict) else None
    return isinstance(info, dict) and info.get("method") in ADAPTER_METHODS


def base_reference(spec: str | Path) -> str:
    """How a run folder names its base: a preset as it is, a file or folder by absolute path
    (so the run loads from any working directory)."""
    spec = str(spec)
    return spec if spec in PRESETS else str(Path(spec).expanduser().resolve())


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's embedding tables in float32: cheap (one
    table, not the whole model) and different for any two trained models."""
    digest = hashlib.sha256()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            digest.update(module.weight.detach().float().contiguous().numpy())
    return digest.hexdigest()[:16]


def qlora_skip(name: str, layer: nn.Module) -> bool:
    """Layers QLoRA keeps in float: the output head (tied to the embedding table in most
    models, which a lookup reads row by row), as QLoRA's reference code does."""
    return name == "lm_head"


def quantize_base_nf4(model: nn.Module) -> None:
    """QLoRA's base: every Linear layer but the output head to NF4 (block 64, double
    quantisation of the scales), in place."""
    from lmarch.quant.apply import quantize_

    quantize_(model, "nf4", skip=qlora_skip)


def dequantize_nf4_layers(model: nn.Module) -> None:
    """Replace every NF4 layer by an ``nn.Linear`` holding its dequantised weight (float32),
    in place: the float model that computes what the NF4 one does."""
    from lmarch.quant.nf4 import NF4Linear

    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            linear.weight = nn.Parameter(module.dequantized_weight())
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().float().clone())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, linear)


def _read_info(source: Source) -> tuple[dict[str, Any], dict[str, Any]]:
    path = source.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc
    info = config.get("finetune")
    needed = ("base", "method", "base_fingerprint", "layers")
    if not is_adapter_run(config) or any(k not in info for k in needed):
        raise LmarchError(f"{path}: the 'finetune' entry is damaged (needs {', '.join(needed)})")
    return config, info


def _check_base(source: Source, config: dict[str, Any], info: dict[str, Any], base: Any) -> None:
    """Refuse a base that is not the model the adapter was trained on, naming the difference."""
    have = json.loads(json.dumps(config_to_dict(base.model.config)))
    saved = config.get("model") or {}
    diffs = [
        f"{key} {saved.get(key)!r} there, {have.get(key)!r} here"
        for key in sorted(set(have) | set(saved))
        if key not in _FREE_FIELDS and have.get(key) != saved.get(key)
    ]
    if diffs:
        raise LmarchError(
            f"{source.path}: its adapter was trained on another base model than "
            f"{info['base']!r} ({'; '.join(diffs[:3])})"
        )
    if base_fingerprint(base.model) != info["base_fingerprint"]:
        raise LmarchError(
            f"{source.path}: the weights of its base {info['base']!r} are not the ones the "
            "adapter was trained on (the embedding table differs)"
        )


def read_finetuned(
    source: Source,
    quant: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    context: int = 8192,
) -> LoadedModel:
    """The model of a LoRA / QLoRA run folder: its base (loaded as :func:`lmarch.load` loads it,
    in float32, with ``context``) plus the adapter, checked and ready to use (eval mode).

    ``quant``: ``"auto"`` is the model as trained (float base for LoRA, NF4 base for QLoRA);
    ``"none"`` float32 (for QLoRA the dequantised NF4 weights); ``"nf4"`` QLoRA's base as
    trained. Other schemes are refused: merge the run (``lmarch merge``) and quantise that.
    """
    from lmarch.loading import load
    from lmarch.peft import load_adapter

    start = time.perf_counter()
    config, info = _read_info(source)
    method = info["method"]
    allowed = ("auto", "none", "nf4") if method == "qlora" else ("auto", "none")
    if quant not in allowed:
        raise LmarchError(
            f"{source.name} is a {method} run; it loads with quant {' or '.join(allowed)}, "
            f"not {quant!r}",
            hint=f"lmarch merge {source.path} --out MERGED, then quantise MERGED",
        )
    nf4 = method == "qlora" and quant != "none"
    if nf4 and dtype is not None:
        raise LmarchError(f"dtype {dtype} is for float models; {source.name} has an NF4 base")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (source.path / name).is_file():
            raise LmarchError(
                f"{source.path} has no {name} yet", hint="has fine-tuning saved a checkpoint?"
            )
    try:
        base = load(info["base"], quant="none", context=context)
    except LmarchError as exc:
        raise LmarchError(
            f"{source.path}: its base model {info['base']!r} cannot be loaded: {exc}"
        ) from exc
    _check_base(source, config, info, base)
    model = base.model
    if method == "qlora":
        quantize_base_nf4(model)
        if not nf4:
            dequantize_nf4_layers(model)
    layers = load_adapter(model, source.path)
    if sorted(layers) != sorted(info["layers"]):
        raise LmarchError(
            f"{source.path}: adapter_model.safetensors adapts {len(layers)} layers, config.json "
            f"lists {len(info['layers'])} (the folder's files do not belong together)"
        )
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device != "cpu":
        model.to(device)
    return LoadedModel(
        model,
        base.tokenizer,
        source.name,
        base.family,
        CAUSAL_LM,
        chat=base.chat,
        quant="nf4" if nf4 else "none",
        load_s=time.perf_counter() - start,
    )
