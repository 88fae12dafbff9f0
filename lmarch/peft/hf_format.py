"""LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

A LoRA on lmarch's layer ``blocks.0.attn.qkv`` of a GPT is stored under the Hugging Face module
path of the same matrix, ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` [r, in]
and ``...lora_B.weight`` [out, r], as ``peft`` writes them. GPT-2's layers are ``Conv1D`` in
transformers (weight stored [in, out], ``fan_in_fan_out: true``), but PEFT keeps A and B in the
``nn.Linear`` orientation for them too, so the adapter tensors cross unchanged. The module paths
come from lmarch's weight name maps (:mod:`lmarch.weights.hf_gpt2`, :mod:`lmarch.weights.hf_llama`).

lmarch fuses LLaMA's q/k/v projections (``attn.qkv``) and gate/up (``ffn.gate_up``); a low-rank
change of a fused matrix is not three independent LoRAs of rank r, so such an adapter is refused
when saving; the other LLaMA projections (``attn.out`` = ``o_proj``, ``ffn.down`` =
``down_proj``) map one to one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmarch.errors import LmarchError
from lmarch.peft.lora import add_lora, lora_layers
from lmarch.weights.name_map import WeightMap
from lmarch.weights.safetensors_io import load_tensors, save_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")

# PEFT options that change what an adapter computes and that lmarch does not implement: refused
# by name when set to anything but their off value.
_UNSUPPORTED = (
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "megatron_config",
)


def _family(model: nn.Module) -> tuple[str, WeightMap, int]:
    """(family, name map, layer count) of an lmarch model that has a Hugging Face layout."""
    from lmarch.models.gpt import GPT
    from lmarch.models.llama import Llama
    from lmarch.weights.hf_gpt2 import gpt2_map
    from lmarch.weights.hf_llama import llama_map

    if isinstance(model, GPT):
        return "gpt2", gpt2_map(model.config), model.config.n_layer
    if isinstance(model, Llama):
        return "llama", llama_map(model.config), model.config.n_layer
    raise LmarchError(
        f"PEFT adapters are written for GPT-2 and LLaMA models, not {type(model).__name__}"
    )


def module_names(model: nn.Module) -> dict[str, str | tuple[str, ...]]:
    """lmarch module name -> Hugging Face module name (a tuple for a matrix HF keeps in parts),
    for every weight matrix of ``model``'s name map."""
    _, wmap, n_layer = _family(model)
    names: dict[str, str | tuple[str, ...]] = {}
    for rule in wmap.rules:
        if not rule.ours.endswith(".weight"):
            continue
        for r in [rule.at_layer(i) for i in range(n_layer)] if "{i}" in rule.ours else [rule]:
            parts = tuple(t.removesuffix(".weight") for t in r.parts)
            names[r.ours.removesuffix(".weight")] = parts if len(parts) > 1 else parts[0]
    return names


def save_adapter(
    model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None
) -> None:
    """Write ``model``'s LoRA adapters to ``folder`` in PEFT's format (loadable with
    ``peft.PeftModel.from_pretrained`` onto the matching ``transformers`` model). Refused: no
    adapters, adapters of different rank/alpha/dropout/rsLoRA, an adapter on a layer fused in
    lmarch but split in Hugging Face, an adapter on a layer the name map does not know."""
    family, _, _ = _family(model)
    layers = lora_layers(model)
    if not layers:
        raise LmarchError("the model has no LoRA adapters to save", hint="call add_lora first")
    names = module_names(model)
    settings = {(m.rank, m.alpha, m.rslora, _dropout(m)) for m in layers.values()}
    if len(settings) > 1:
        raise LmarchError(
            "adapters of different rank/alpha/dropout/rsLoRA cannot be saved together"
        )
    rank, alpha, rslora, dropout = settings.pop()
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for name, layer in layers.items():
        if layer.merged:
            raise LmarchError(f"LoRA layer {name!r} is merged", hint="call unmerge_lora first")
        hf = names.get(name)
        if hf is None:
            raise LmarchError(
                f"layer {name!r} has no Hugging Face name, so its adapter cannot be saved"
            )
        if isinstance(hf, tuple):
            raise LmarchError(
                f"layer {name!r} is fused in lmarch but split in Hugging Face ({', '.join(hf)}); "
                "its LoRA cannot be written as PEFT adapters",
                hint="target the unfused projections (attn.out, ffn.down) instead",
            )
        targets.append(hf)
        tensors[f"{_PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{_PREFIX}{hf}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        # transformers' GPT-2 projections are Conv1D (weight [in, out])
        "fan_in_fan_out": family == "gpt2",
        "bias": "none",
        "target_modules": sorted(targets),
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(tensors, out / WEIGHTS_FILE)


def _dropout(layer: nn.Module) -> float:
    d = layer.lora_dropout
    return float(d.p) if isinstance(d, nn.Dropout) else 0.0


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LmarchError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmarchError(f"{path} is not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise LmarchError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported (LORA only)"
        )
    for field in _UNSUPPORTED:
        if config.get(field):
            raise LmarchError(f"{path}: PEFT option {field}={config[field]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise LmarchError(
            f"{path}: PEFT option bias={config['bias']!r} is not supported (only 'none')"
        )
    if config.get("init_lora_weights") not in (None, True, False, "gaussian"):
        # initialisations computed from data (PiSSA, OLoRA, LoftQ, ...) also change the base weight
        raise LmarchError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} is not supported"
        )
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Add the LoRA adapters of the PEFT folder ``folder`` to ``model`` (rank, alpha, dropout and
    rsLoRA from its config, the layers from its tensors); returns lmarch's names of the layers.
    Refused: PEFT options lmarch does not implement (by name), tensors for layers the model does
    not have, shapes that do not match the model (an adapter made for another base)."""
    folder = Path(folder)
    config = _read_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise LmarchError(f"{folder} has no {WEIGHTS_FILE}")
    tensors = load_tensors(path)
    ours = {hf: name for name, hf in module_names(model).items() if isinstance(hf, str)}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LmarchError(f"{path}: tensor {key!r} is not a LoRA A/B matrix lmarch knows")
        name = ours.get(m.group(1))
        if name is None:
            raise LmarchError(
                f"{path}: adapter for {m.group(1)!r}, a layer this model does not have"
            )
        found.setdefault(name, {})[m.group(2)] = t
    if not found:
        raise LmarchError(f"{path} holds no LoRA tensors")
    rank = int(config["r"])
    names = add_lora(
        model,
        [re.escape(n) for n in found],
        rank=rank,
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
    )
    layers = lora_layers(model)
    for name in names:
        layer, pair = layers[name], found[name]
        for part in "AB":
            if part not in pair:
                raise LmarchError(f"{path}: lora_{part} of layer {name!r} is missing")
            param = getattr(layer, f"lora_{part}")
            if tuple(pair[part].shape) != tuple(param.shape):
                raise LmarchError(
                    f"{path}: lora_{part} of {name!r} has shape {tuple(pair[part].shape)}, "
                    f"this model needs {tuple(param.shape)} (an adapter for another base model?)"
                )
            with torch.no_grad():
                param.copy_(pair[part])
    return names
