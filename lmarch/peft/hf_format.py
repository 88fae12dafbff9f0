"""LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

A LoRA on lmarch's layer ``blocks.0.attn.qkv`` of a GPT is stored under the Hugging Face module
path of the same matrix, ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` [r, in]
and ``...lora_B.weight`` [out, r], as ``peft`` writes them. GPT-2's layers are ``Conv1D`` in
transformers (weight stored [in, out], ``fan_in_fan_out: true``), but PEFT keeps A and B in the
``nn.Linear`` orientation for them too, so the adapter tensors cross unchanged. The module paths
come from lmarch's weight name maps (:mod:`lmarch.weights.hf_gpt2`, :mod:`lmarch.weights.hf_llama`,
:mod:`lmarch.weights.hf_bert` for BERT, RoBERTa, ALBERT and ELECTRA, bare or with a task head).
Layers of other ranks or alphas than the adapter's most common ones are written to PEFT's
``rank_pattern`` / ``alpha_pattern`` under their full module path, and read back with PEFT's
matching rule.

lmarch fuses LLaMA's q/k/v projections (``attn.qkv``) and gate/up (``ffn.gate_up``). Both ways
are exact:

- saving a LoRA of a fused layer, W' = W + s B A with B = [B_q; B_k; B_v] split by rows, writes
  the parts as PEFT LoRAs that share A: q_proj gets (A, B_q), k_proj (A, B_k), v_proj (A, B_v);
- loading PEFT LoRAs of some of the parts gives the fused layer the block-structured adapter
  A = [A_q; A_v] (rank 2r), B = [[B_q, 0], [0, 0], [0, B_v]] (zero rows for a part without an
  adapter), with PEFT's s = alpha/r; when the parts share one A (as lmarch writes them), it is
  the rank-r adapter (A, [B_q; B_k; B_v]) again.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmarch.errors import LmarchError
from lmarch.peft.lora import (
    LoRALinear,
    QuantLoRALinear,
    _quantised_types,
    _set_module,
    lora_layers,
    lora_scaling,
)
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
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "megatron_config",
)


def _family(model: nn.Module) -> tuple[str, WeightMap, int, dict[str, tuple[int, ...]]]:
    """(family, name map, block count, row counts of fused tensors' parts) of an lmarch model
    that has a Hugging Face layout."""
    from lmarch.models.bert import BertModel
    from lmarch.models.bert_heads import EncoderWithHead
    from lmarch.models.gpt import GPT
    from lmarch.models.llama import Llama
    from lmarch.weights.hf_gpt2 import gpt2_map
    from lmarch.weights.hf_llama import llama_map, split_sizes

    if isinstance(model, GPT):
        return "gpt2", gpt2_map(model.config), model.config.n_layer, {}
    if isinstance(model, Llama):
        c = model.config
        return "llama", llama_map(c), c.n_layer, split_sizes(c)
    if isinstance(model, (BertModel, EncoderWithHead)):
        from lmarch.weights.hf_bert import map_for_model

        c = model.config
        encoder = model if isinstance(model, BertModel) else model.bert
        prefix = "" if isinstance(model, BertModel) else "bert."
        # ALBERT shares one block per group: HF names the groups, not the layers
        sizes = {f"{prefix}blocks.{{i}}.attn.qkv.weight": (c.n_embd,) * 3}
        return "bert", map_for_model(model), len(encoder.blocks), sizes
    raise LmarchError(
        "PEFT adapters are written for GPT-2, LLaMA and BERT-family models, "
        f"not {type(model).__name__}"
    )


def module_names(model: nn.Module) -> dict[str, str | tuple[str, ...]]:
    """lmarch module name -> Hugging Face module name (a tuple for a matrix HF keeps in parts),
    for every weight matrix of ``model``'s name map."""
    _, wmap, n_layer, _ = _family(model)
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
    family, _, _, sizes = _family(model)
    layers = lora_layers(model)
    if not layers:
        raise LmarchError("the model has no LoRA adapters to save", hint="call add_lora first")
    names = module_names(model)
    for name, m in layers.items():
        if m.scaling != lora_scaling(m.rank, m.alpha, m.rslora):
            # a block adapter loaded from separate PEFT parts: its scale is not alpha/rank
            raise LmarchError(
                f"LoRA layer {name!r} has rank {m.rank} but scale {m.scaling}: it cannot be "
                "written with one PEFT rank"
            )
    settings = {(m.rslora, _dropout(m)) for m in layers.values()}
    if len(settings) > 1:
        raise LmarchError("adapters of different dropout or rsLoRA cannot be saved together")
    rslora, dropout = settings.pop()
    # the most common rank and alpha are the defaults; the other layers go to PEFT's patterns
    ranks = Counter(m.rank for m in layers.values())
    alphas = Counter(m.alpha for m in layers.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
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
        parts = hf if isinstance(hf, tuple) else (hf,)
        # a fused layer: its parts share A and take B's rows (W' = W + s B A row block by block)
        rows = _part_rows(name, sizes) if len(parts) > 1 else (layer.out_features,)
        for part, b in zip(parts, layer.lora_B.detach().split(rows, dim=0)):
            targets.append(part)
            if layer.rank != rank:
                rank_pattern[part] = layer.rank
            if layer.alpha != alpha:
                alpha_pattern[part] = layer.alpha
            tensors[f"{_PREFIX}{part}.lora_A.weight"] = layer.lora_A.detach().clone()
            tensors[f"{_PREFIX}{part}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES.get((family, _task(model))),
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
        # full module paths: PEFT matches a key k against a name n by re.match(rf"(.*\.)?({k})$", n)
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(tensors, out / WEIGHTS_FILE)


def _part_rows(name: str, sizes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Row counts of the parts of fused layer ``name`` (``blocks.3.attn.qkv``,
    ``bert.blocks.0.attn.qkv``)."""
    generic = re.sub(r"(^|\.)blocks\.\d+\.", r"\1blocks.{i}.", name, count=1) + ".weight"
    return sizes[generic]


def _task(model: nn.Module) -> str:
    """``"base"`` for GPT, LLaMA and a bare encoder; else the BERT task model's task."""
    from lmarch.models.bert_heads import EncoderWithHead

    if isinstance(model, EncoderWithHead):
        from lmarch.models.heads import bert_task_of

        return bert_task_of(model)
    return "base"


# PEFT's task_type for each lmarch model: it picks the PeftModel class. The classification ones
# are left out on purpose: PEFT would then also expect the (untouched) head in the adapter.
_TASK_TYPES = {
    ("gpt2", "base"): "CAUSAL_LM",
    ("llama", "base"): "CAUSAL_LM",
    ("bert", "base"): "FEATURE_EXTRACTION",
}


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    r"""PEFT's per-layer override: the value of the first key ``k`` of ``patterns`` (a rank or
    alpha pattern) for which ``re.match(rf"(.*\.)?({k})$", module)`` holds, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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
    _, _, _, sizes = _family(model)
    # Hugging Face module -> (lmarch module, index of the part, all parts)
    ours: dict[str, tuple[str, int, tuple[str, ...]]] = {}
    names = module_names(model)
    for name, hf in names.items():
        parts = hf if isinstance(hf, tuple) else (hf,)
        for k, part in enumerate(parts):
            ours[part] = (name, k, parts)
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LmarchError(f"{path}: tensor {key!r} is not a LoRA A/B matrix lmarch knows")
        where = ours.get(m.group(1))
        if where is None:
            raise LmarchError(
                f"{path}: adapter for {m.group(1)!r}, a layer this model does not have"
            )
        found.setdefault(where[0], {}).setdefault(where[1], {})[m.group(2)] = t
    if not found:
        raise LmarchError(f"{path} holds no LoRA tensors")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LmarchError(f"{folder / CONFIG_FILE}: r={rank!r} is not a positive rank")
    alpha = float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = _patterns(config, folder / CONFIG_FILE)
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    modules = dict(model.named_modules())
    built: dict[
        str, LoRALinear | QuantLoRALinear
    ] = {}  # every layer checked before the model is changed
    for name, by_part in found.items():
        layer = modules.get(name)
        quantised = isinstance(layer, _quantised_types())
        if type(layer) is not nn.Linear and not quantised:
            raise LmarchError(f"{path}: layer {name!r} is not a plain nn.Linear (already adapted?)")
        hf_parts = names[name] if isinstance(names[name], tuple) else (names[name],)
        first: tuple[int, float, float] | None = None  # (rank, alpha, scale) of the first part
        for k, pair in sorted(by_part.items()):
            for part in "AB":
                if part not in pair:
                    raise LmarchError(f"{path}: lora_{part} of {name!r} (part {k}) is missing")
            hf = hf_parts[k] if k < len(hf_parts) else name
            r_k = pattern_value(rank_pattern, hf, rank)
            alpha_k = float(pattern_value(alpha_pattern, hf, alpha))
            if pair["A"].shape[0] != r_k:
                raise LmarchError(
                    f"{path}: the adapter of {name!r} has rank {pair['A'].shape[0]}, the config "
                    f"says r={r_k} for {hf!r}"
                )
            scale = lora_scaling(r_k, alpha_k, rslora)
            if first is None:
                first = (r_k, alpha_k, scale)
            elif scale != first[2]:
                # parts of one fused layer with their own scales: fold the ratio into B
                pair["B"] = pair["B"] * (scale / first[2])
        assert first is not None
        part_rank, part_alpha, part_scale = first
        rows = _part_rows(name, sizes) if isinstance(names[name], tuple) else (layer.out_features,)
        a, b = _fuse(by_part, rows, name, path)
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise LmarchError(
                f"{path}: the adapter of {name!r} is for a {b.shape[0]}x{a.shape[1]} layer, this "
                f"model's is {layer.out_features}x{layer.in_features} (an adapter for another base model?)"
            )
        if quantised:
            lora: LoRALinear | QuantLoRALinear = QuantLoRALinear(
                layer, a.shape[0], part_alpha, dropout, rslora
            )
        else:
            lora = LoRALinear.from_linear(layer, a.shape[0], part_alpha, dropout, rslora)
        lora.scaling = part_scale  # PEFT's scale for the part's r, even for a block adapter
        del part_rank
        with torch.no_grad():
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        built[name] = lora
    for name, lora in built.items():
        _set_module(model, name, lora)
    return list(built)


def _patterns(config: dict[str, Any], path: Path) -> tuple[dict[str, int], dict[str, float]]:
    """The config's ``rank_pattern`` and ``alpha_pattern``, checked (module regex -> number)."""
    out = []
    for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = config.get(field) or {}
        ok = isinstance(pattern, dict) and all(
            isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in pattern.values()
        )
        if not ok:
            raise LmarchError(f"{path}: {field} must map module patterns to positive numbers")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise LmarchError(f"{path}: {field} key {key!r} is not a regex ({e})") from None
        out.append(pattern)
    return out[0], out[1]


def _fuse(
    by_part: dict[int, dict[str, torch.Tensor]], rows: tuple[int, ...], name: str, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter (A [R, in], B [out, R]) for a layer from its parts' adapters: B's row block k
    is part k's B (zeros for a part without one); with one A shared by every part R = r, else
    the parts' A are stacked (R = r x parts) and B is block-structured."""
    if any(k >= len(rows) for k in by_part):
        raise LmarchError(f"{path}: an adapter part of {name!r} this model does not have")
    for k, pair in by_part.items():
        if pair["B"].shape[0] != rows[k] or pair["B"].shape[1] != pair["A"].shape[0]:
            raise LmarchError(
                f"{path}: lora_B of {name!r} (part {k}) has shape {tuple(pair['B'].shape)}, "
                f"this model needs {rows[k]} rows (an adapter for another base model?)"
            )
    a_list = [pair["A"] for pair in by_part.values()]
    shared = all(a.shape == a_list[0].shape and torch.equal(a, a_list[0]) for a in a_list)
    r = a_list[0].shape[0]
    width = r if shared else sum(a.shape[0] for a in a_list)
    b = torch.zeros(sum(rows), width, dtype=a_list[0].dtype)
    col = 0
    for k, pair in sorted(by_part.items()):
        top = sum(rows[:k])
        n = pair["A"].shape[0]
        c0 = 0 if shared else col
        b[top : top + rows[k], c0 : c0 + n] = pair["B"]
        col += n
    a = a_list[0] if shared else torch.cat([by_part[k]["A"] for k in sorted(by_part)], dim=0)
    return a, b
