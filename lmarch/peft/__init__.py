"""Parameter-efficient fine-tuning: LoRA adapters (:mod:`lmarch.peft.lora`) and PEFT's on-disk
format for them (:mod:`lmarch.peft.hf_format`)."""

from lmarch.peft.hf_format import load_adapter, save_adapter
from lmarch.peft.lora import (
    LoRALinear,
    QuantLoRALinear,
    add_lora,
    lora_layers,
    lora_scaling,
    mark_only_lora_trainable,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "LoRALinear",
    "QuantLoRALinear",
    "add_lora",
    "load_adapter",
    "lora_layers",
    "lora_scaling",
    "mark_only_lora_trainable",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]
