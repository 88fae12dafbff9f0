"""Fine-tuning a pretrained causal LM on a corpus: ``lmarch finetune`` and ``lmarch merge``.

Three methods, one loop (:class:`~lmarch.train.trainer.Trainer`):

- ``full``: every parameter trains; the run folder holds the whole model, as ``lmarch train``'s;
- ``lora``: the base is frozen and LoRA adapters train on its Linear layers (Hu et al. 2021,
  "LoRA: Low-Rank Adaptation of Large Language Models"): W' = W + (alpha / r) B A;
- ``qlora``: the same adapters over a base whose Linear layers are stored in 4-bit NormalFloat
  and dequantised on the fly (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
  LLMs"); the output head stays in float, as in QLoRA's reference code.

The model is loaded in float32 (``lmarch.load(MODEL, quant="none")``) and the text tokenised with
its own tokenizer. An adapter run folder holds no copy of the base: it names it (``config.json``
``"finetune": {"base": ...}``, an absolute path for a file or folder) and keeps the adapter in
PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by ``peft`` onto
the matching ``transformers`` model); :func:`lmarch.load` rebuilds base + adapter from it
(:mod:`lmarch.loading.finetuned`). :func:`merge_run` folds an adapter into the weights and writes
a standalone run folder (for QLoRA: the dequantised NF4 base plus the adapter's product).

Validation loss before and after is measured on the same batches of held-out text (the last
``val_fraction`` of every document, as ``lmarch train`` and ``lmarch eval`` split it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmarch.data.batches import RandomBlockSampler
from lmarch.data.corpus import load_documents, train_val_split
from lmarch.errors import LmarchError
from lmarch.loading import LoadedModel, load
from lmarch.loading.finetuned import (
    ADAPTER_METHODS,
    METHODS,
    base_fingerprint,
    base_reference,
    quantize_base_nf4,
)
from lmarch.models.registry import config_to_dict
from lmarch.peft import add_lora, lora_layers, mark_only_lora_trainable, merge_lora, save_adapter
from lmarch.settings import build_config, route_settings, setting
from lmarch.train.adapter_trainer import AdapterTrainer
from lmarch.train.callbacks import LossPlot, ProgressBar
from lmarch.train.config import TrainConfig, merge_saved_settings
from lmarch.train.distributed import is_main, rank_zero, teardown
from lmarch.train.trainer import Callback, Trainer, causal_lm_loss
from lmarch.weights.checkpoint import read_json, write_json
from lmarch.weights.run_log import append_metrics
from lmarch.weights.safetensors_io import unique_state_dict

__all__ = [
    "DEFAULT_TARGETS",
    "FINETUNE_TRAIN_DEFAULTS",
    "LEARNING_RATES",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "match_targets",
    "merge_run",
]

# attention and MLP projections of every block (GPT: qkv, out, fc_in, fc_out; LLaMA: qkv, out,
# gate_up, down); the output head is left alone (tied to the embeddings in most models)
DEFAULT_TARGETS = r"blocks\.\d+\.(attn|ffn)\.\w+"

# training settings that suit fine-tuning a pretrained model (TrainConfig's are for pretraining)
FINETUNE_TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "max_iters": 200,
    "warmup_iters": 10,
    "eval_interval": 50,
    "eval_iters": 10,
    "log_interval": 10,
    "weight_decay": 0.0,
}
# peak learning rates: adapters start from B = 0 and take larger steps than the full weights
LEARNING_RATES = {"full": (5e-5, 5e-6), "lora": (1e-3, 1e-4), "qlora": (1e-3, 1e-4)}


@dataclasses.dataclass
class FinetuneConfig:
    """What is fine-tuned and how; the training loop's settings are :class:`TrainConfig`'s."""

    method: str = setting("lora", "'full' (every weight), 'lora' or 'qlora' (LoRA on NF4 base)")
    rank: int = setting(4, "LoRA rank r (lora, qlora)")
    alpha: float = setting(8.0, "LoRA alpha: the adapter is scaled by alpha / r")
    dropout: float = setting(0.0, "dropout on the adapters' input (lora, qlora)")
    rslora: bool = setting(False, "scale by alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)")
    targets: str | None = setting(
        None,
        "regular expression over Linear layer names (e.g. 'attn.qkv|ffn.down'; a name matches "
        "whole or after a dot); unset: attention and MLP projections of every block",
    )
    block_size: int = setting(256, "tokens per training window (capped at the model's context)")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmarchError(
                f"unknown fine-tuning method {self.method!r}", hint=f"one of {', '.join(METHODS)}"
            )
        for name, low in (("rank", 1), ("block_size", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LmarchError(
                    f"FinetuneConfig.{name} must be an integer >= {low}, got {value!r}"
                )
        if not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise LmarchError(f"FinetuneConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise LmarchError(f"FinetuneConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise LmarchError(
                    f"--targets {self.targets!r} is not a regular expression ({exc})"
                ) from None


@dataclasses.dataclass
class FinetuneResult:
    """What a fine-tuning run reports (``--json`` prints :meth:`as_dict`)."""

    method: str
    iters: int
    train_loss: float
    val_loss_before: float
    val_loss_after: float
    trainable_params: int
    total_params: int
    tokens_per_s: float
    out: str

    @property
    def trainable_share(self) -> float:
        """Trained parameters / all parameters (adapters included, as PEFT counts them)."""
        return self.trainable_params / self.total_params

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            **dataclasses.asdict(self),
            "val_loss_drop": self.val_loss_before - self.val_loss_after,
            "trainable_share": self.trainable_share,
        }


def split_finetune_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route each ``--set`` key to :class:`FinetuneConfig` or :class:`TrainConfig`, parsing
    strings by the field's type; a key neither has is refused, listing the valid ones."""
    ft, train = route_settings(overrides, FinetuneConfig, TrainConfig)
    return ft, train


def match_targets(model: nn.Module, pattern: str) -> list[str]:
    """Names of ``model``'s Linear layers (float or quantised) that ``pattern`` names: the
    whole name matches it, or the part after some dot does (``attn.qkv`` names
    ``blocks.3.attn.qkv``). Refused: a pattern that names no Linear layer."""
    from lmarch.peft.lora import _quantised_types

    kinds = (nn.Linear, *_quantised_types())
    compiled = re.compile(rf"(?:.*\.)?(?:{pattern})")
    linears = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    chosen = [n for n in linears if compiled.fullmatch(n)]
    if not chosen:
        raise LmarchError(
            f"--targets {pattern!r} matches no Linear layer of the model",
            hint=f"layer names look like {', '.join(linears[:4])}",
        )
    return chosen


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def _data_reference(data: str) -> str:
    """The corpus spec as the run config keeps it: an absolute path for a file or folder."""
    if data in ("shakespeare", "tinyshakespeare"):
        return data
    return str(Path(data).expanduser().resolve())


def _samplers(
    loaded: LoadedModel, data: str, train_cfg: TrainConfig, block_size: int
) -> tuple[RandomBlockSampler, RandomBlockSampler, str]:
    docs = load_documents(data)
    train_text, val_text = train_val_split(docs, train_cfg.val_fraction)
    encode = loaded.tokenizer.encode
    train_ids = torch.tensor(encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(encode(val_text), dtype=torch.long)
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= block_size + 1:
            raise LmarchError(
                f"the {split} split has only {len(ids)} tokens, too few for block_size {block_size}",
                hint="give more text or --set block_size=SMALLER",
            )
    train = RandomBlockSampler(train_ids, block_size, train_cfg.batch_size, train_cfg.seed)
    val = RandomBlockSampler(val_ids, block_size, train_cfg.batch_size, train_cfg.seed + 1)
    return train, val, f"{len(train_ids):,} train / {len(val_ids):,} val tokens"


def prepare_model(loaded: LoadedModel, cfg: FinetuneConfig) -> tuple[list[str], int]:
    """Make ``loaded.model`` ready to fine-tune by ``cfg.method``, in place: for ``qlora`` its
    Linear layers (but the output head) become NF4, for ``lora`` / ``qlora`` adapters go onto
    the target layers and only they train. Returns (adapted layer names, trainable count)."""
    model = loaded.model
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return [], _count(model)
    if loaded.family not in ("gpt", "llama"):
        raise LmarchError(
            f"{loaded.name} is {loaded.describe()}: LoRA adapters are saved in PEFT's format for "
            "the GPT-2 and LLaMA families only",
            hint="--method full fine-tunes any causal LM",
        )
    names = match_targets(model, cfg.targets or DEFAULT_TARGETS)
    if cfg.method == "qlora":
        quantize_base_nf4(model)
    # one alternation of the exact names: add_lora's own checks (rank, tied weights) then apply
    add_lora(
        model, "|".join(re.escape(n) for n in names), cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora
    )
    return names, mark_only_lora_trainable(model)


def finetune(
    model: str | None,
    data: str,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] | None = None,
    log: Callable[[str], object] = print,
) -> FinetuneResult:
    """Fine-tune ``model`` (anything :func:`lmarch.load` takes) on ``data`` into run folder
    ``out``, or continue that run with ``resume`` (its saved settings, ``overrides`` of the
    training settings on top, e.g. a larger ``max_iters``).

    ``overrides`` holds :class:`FinetuneConfig` keys (method, rank, alpha, dropout, rslora,
    targets, block_size) and :class:`TrainConfig` keys; training defaults are
    :data:`FINETUNE_TRAIN_DEFAULTS` and the method's learning rate (:data:`LEARNING_RATES`).
    """
    out = Path(out)
    main_rank = is_main()  # under torchrun only rank 0 logs and writes the run folder
    log = rank_zero(log)
    ft_over, train_over = split_finetune_overrides(dict(overrides or {}))
    if resume:
        if not (out / "config.json").is_file():
            raise LmarchError(f"nothing to resume in {out}", hint="drop --resume to start a run")
        saved = read_json(out / "config.json")
        if not isinstance(saved, dict) or not isinstance(saved.get("finetune"), dict):
            raise LmarchError(f"{out} is not a fine-tuning run folder")
        if ft_over:
            raise LmarchError(f"cannot change fine-tuning settings on resume: {sorted(ft_over)}")
        info = saved["finetune"]
        base = info["base"]
        if model is not None and base_reference(model) != base:
            raise LmarchError(f"{out} fine-tunes {base}, not {model}", hint="drop MODEL to resume")
        cfg = build_config(FinetuneConfig, info["settings"])
        train_cfg = build_config(TrainConfig, merge_saved_settings(saved["train"], train_over))
        data = saved["data"]
    else:
        if model is None:
            raise LmarchError("no model given", hint="e.g. lmarch finetune smollm2-135m --out DIR")
        cfg = build_config(FinetuneConfig, ft_over)
        lr, min_lr = LEARNING_RATES[cfg.method]
        defaults = {**FINETUNE_TRAIN_DEFAULTS, "learning_rate": lr, "min_lr": min_lr}
        train_cfg = build_config(TrainConfig, {**defaults, **train_over})
        base, data = base_reference(model), _data_reference(data)
        if Path(base) == out.expanduser().resolve():
            raise LmarchError(f"--out {out} is the model's own folder; it would be overwritten")
    if train_cfg.strategy in ("fsdp", "tp") and cfg.method in ADAPTER_METHODS:
        raise LmarchError(
            f"--strategy {train_cfg.strategy} fine-tunes all weights (--method full), not "
            f"{cfg.method}",
            hint="adapters are small: use --strategy ddp",
        )
    loaded = load(base, quant="none").require("causal-lm", "finetune")
    if loaded.quant != "none":  # a folder lmarch quantize wrote keeps its quantised layers
        raise LmarchError(
            f"{loaded.name} is stored quantised ({loaded.quant}); fine-tuning starts from float "
            "weights",
            hint="fine-tune the float model it came from (--method qlora quantises it to NF4)",
        )
    block_size = min(cfg.block_size, loaded.model.max_positions)
    train_batches, val_batches, sizes = _samplers(loaded, data, train_cfg, block_size)
    fingerprint = base_fingerprint(loaded.model)
    if resume and fingerprint != saved["finetune"]["base_fingerprint"]:
        raise LmarchError(f"the base model {base!r} has changed since {out} was started")
    base_params = _count(loaded.model)
    torch.manual_seed(train_cfg.seed)  # the adapters' initial A
    names, trainable = prepare_model(loaded, cfg)
    adapters = cfg.method in ADAPTER_METHODS
    total = base_params + (trainable if adapters else 0)
    finetune_info = {
        "base": base,
        "method": cfg.method,
        "rank": cfg.rank if adapters else None,
        "alpha": cfg.alpha if adapters else None,
        "targets": (cfg.targets or DEFAULT_TARGETS) if adapters else None,
        "layers": names,
        "settings": dataclasses.asdict(cfg),
        "base_fingerprint": fingerprint,
        "trainable_params": trainable,
        "total_params": total,
    }
    if resume:
        finetune_info["val_loss_before"] = saved["finetune"].get("val_loss_before")
    elif main_rank:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "adapter_config.json", "adapter_model.safetensors"):
            (out / stale).unlink(missing_ok=True)
        loaded.tokenizer.save(out / "tokenizer.json")
    log(
        f"{loaded.name}: {cfg.method}, {trainable:,} of {total:,} parameters train "
        f"({trainable / total:.3%}), {sizes}"
    )
    kwargs: dict[str, Any] = {
        "out_dir": out,
        "loss_fn": causal_lm_loss,
        "callbacks": [ProgressBar(), LossPlot()] if callbacks is None else callbacks,
    }
    if adapters:
        trainer: Trainer = AdapterTrainer(
            loaded.model,
            train_batches,
            val_batches,
            train_cfg,
            on_save=lambda m: save_adapter(m, out, base_model_name_or_path=base),
            **kwargs,
        )
    else:
        trainer = Trainer(loaded.model, train_batches, val_batches, train_cfg, **kwargs)
    if not resume:
        before = trainer.evaluate()
        finetune_info["val_loss_before"] = before["val_loss"]
        if main_rank:
            append_metrics(out / "metrics.jsonl", {"iter": 0, **before})
    run_config = {
        "model": config_to_dict(loaded.model.config),
        "objective": "clm",
        "chat": dataclasses.asdict(loaded.chat),
        "source": loaded.name,
        "data": data,
        "train": dataclasses.asdict(train_cfg),
        "finetune": finetune_info,
    }
    if main_rank:
        write_json(out / "config.json", run_config)
    try:
        result = trainer.fit(resume=resume)
    finally:
        trainer.release()
        teardown()  # leave the process group (if the strategy started one)
    return FinetuneResult(
        method=cfg.method,
        iters=result.iters,
        train_loss=result.train_loss,
        val_loss_before=float(finetune_info["val_loss_before"]),
        val_loss_after=result.val_loss,
        trainable_params=trainable,
        total_params=total,
        tokens_per_s=result.tokens_per_s,
        out=str(out),
    )


def merge_run(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Fold the adapter of fine-tuning run ``run_dir`` into its base's weights (W <- W + s B A)
    and write the result to ``out`` as a standalone run folder (no adapter, no reference to
    the base). A QLoRA run's base is its NF4 weights dequantised to float32, so the merged
    model computes what the adapter run computes, up to float rounding. Refused: a folder
    without an adapter. Returns a summary."""
    from lmarch.loading.saving import save_loaded
    from lmarch.loading.sources import resolve

    source = resolve(run_dir)
    if source.kind != "finetuned":
        raise LmarchError(
            f"{run_dir} holds no adapter to merge",
            hint="merge takes a folder of 'lmarch finetune --method lora' or qlora; other run "
            "folders hold full weights already",
        )
    loaded = load(run_dir, quant="none")  # a QLoRA base as dequantised float32 layers
    info = read_json(Path(run_dir) / "config.json")
    layers = lora_layers(loaded.model)
    merge_lora(loaded.model)
    tensors = {
        k: v
        for k, v in unique_state_dict(loaded.model).items()
        if not k.endswith((".lora_A", ".lora_B"))
    }
    extra = {
        "train": info.get("train", {}),
        "merged_from": {**info["finetune"], "run": str(Path(run_dir).resolve())},
    }
    save_loaded(loaded, out, extra=extra, tensors=tensors)
    return {"run": str(run_dir), "out": str(out), "method": info["finetune"]["method"],
            "merged_layers": len(layers)}  # fmt: skip
