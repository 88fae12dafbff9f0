"""The BERT family in the Hugging Face layout: BERT, RoBERTa, ALBERT and ELECTRA checkpoints.

Their query/key/value projections are three matrices; ours are one fused ``qkv``, so their rows
are concatenated on the way in and cut in three on the way out. ALBERT stores its shared blocks as
``albert_layer_groups.{g}.albert_layers.0`` — one entry per distinct block, which is also how many
blocks we hold. A task model keeps its encoder under a prefix (``bert.``, ``roberta.``,
``albert.``, ``electra.``); a bare encoder checkpoint (as sentence-transformers saves one) has none.
Output embeddings tied to the input ones are stored once, as the input embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.bert import BertConfig
from lmarch.models.heads import bert_task_of, build_bert_task_model
from lmarch.nn.init import empty_weights
from lmarch.weights.hf import (
    COMMON_INERT,
    HFConfigFields,
    build_from_weights,
    read_hf_config,
    read_hf_weights,
    write_hf_folder,
)
from lmarch.weights.name_map import Rule, WeightMap
from lmarch.weights.safetensors_io import unique_state_dict

# model_type -> (class-name stem, prefix of the encoder inside task models)
_STEMS = {"bert": "Bert", "roberta": "Roberta", "albert": "Albert", "electra": "Electra"}
TASKS = (
    "base",
    "masked_lm",
    "sequence_classification",
    "token_classification",
    "question_answering",
    "pretraining",
)
_TASK_SUFFIX = {
    "base": "Model",
    "masked_lm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
    "pretraining": "ForPreTraining",
}
_ACT_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# names on their side that hold no weights of their own: buffers and tied aliases
_ALIASES = [
    r"embeddings\.position_ids$",
    r"embeddings\.token_type_ids$",
    r"^cls\.predictions\.decoder\.(weight|bias)$",
    r"^lm_head\.decoder\.(weight|bias)$",
    r"^predictions\.decoder\.(weight|bias)$",
    r"^generator_lm_head\.weight$",
]


def _pair(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.{w}", f"{theirs}.{w}") for w in ("weight", "bias")]


def encoder_rules(
    c: BertConfig, ours: str = "", theirs: str = "", pooler: bool = True
) -> list[Rule]:
    """Rules for the encoder (embeddings, blocks, pooler) with the given name prefixes."""
    o, t = ours, theirs
    rules = [
        Rule(o + "tok_emb.weight", t + "embeddings.word_embeddings.weight"),
        Rule(o + "pos_emb.weight", t + "embeddings.position_embeddings.weight"),
        Rule(o + "type_emb.weight", t + "embeddings.token_type_embeddings.weight"),
        *_pair(o + "norm_emb", t + "embeddings.LayerNorm"),
    ]
    b = o + "blocks.{i}."
    if c.variant == "albert":
        layer = t + "encoder.albert_layer_groups.{i}.albert_layers.0."
        qkv = [layer + f"attention.{p}" for p in ("query", "key", "value")]
        out, norm_attn = layer + "attention.dense", layer + "attention.LayerNorm"
        fc_in, fc_out, norm_ffn = (
            layer + "ffn",
            layer + "ffn_output",
            layer + "full_layer_layer_norm",
        )
        proj = t + "encoder.embedding_hidden_mapping_in"
    else:
        layer = t + "encoder.layer.{i}."
        qkv = [layer + f"attention.self.{p}" for p in ("query", "key", "value")]
        out, norm_attn = layer + "attention.output.dense", layer + "attention.output.LayerNorm"
        fc_in, fc_out, norm_ffn = (
            layer + "intermediate.dense",
            layer + "output.dense",
            layer + "output.LayerNorm",
        )
        proj = t + "embeddings_project"
    for w in ("weight", "bias"):
        rules.append(Rule(f"{b}attn.qkv.{w}", tuple(f"{p}.{w}" for p in qkv)))
    rules += _pair(b + "attn.out", out) + _pair(b + "norm_attn", norm_attn)
    rules += _pair(b + "ffn.fc_in", fc_in) + _pair(b + "ffn.fc_out", fc_out)
    rules += _pair(b + "norm_ffn", norm_ffn)
    if c.embedding_size is not None:
        rules += _pair(o + "emb_proj", proj)
    if pooler:
        rules += _pair(o + "pooler", t + ("pooler" if c.variant == "albert" else "pooler.dense"))
    return rules


def _mlm_rules(variant: str) -> list[Rule]:
    dense, norm, bias = {
        "bert": (
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.bias",
        ),
        "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
        "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
        "electra": (
            "generator_predictions.dense",
            "generator_predictions.LayerNorm",
            "generator_lm_head.bias",
        ),
    }[variant]
    return _pair("mlm.dense", dense) + _pair("mlm.norm", norm) + [Rule("mlm.decoder.bias", bias)]


def _head_rules(c: BertConfig, task: str) -> list[Rule]:
    v = c.variant
    if task == "masked_lm":
        return _mlm_rules(v)
    if task == "sequence_classification":
        if v in ("bert", "albert"):
            return _pair("classifier", "classifier")
        return _pair("classifier.dense", "classifier.dense") + _pair(
            "classifier.out_proj", "classifier.out_proj"
        )
    if task == "token_classification":
        return _pair("classifier", "classifier")
    if task == "question_answering":
        return _pair("qa", "qa_outputs")
    if task == "pretraining" and v == "electra":
        return _pair("discriminator.dense", "discriminator_predictions.dense") + _pair(
            "discriminator.out_proj", "discriminator_predictions.dense_prediction"
        )
    if task == "pretraining" and v == "albert":
        return _mlm_rules(v) + _pair("sop", "sop_classifier.classifier")
    raise LmarchError(f"no {task!r} head for the {v} variant")


def task_of(model: nn.Module) -> str:
    """The task name of one of our BERT-family model classes (see
    :func:`lmarch.models.heads.bert_task_of`); the classify-train classifier has no Hugging
    Face class."""
    task = bert_task_of(model)
    if task not in TASKS:
        raise LmarchError(f"a {type(model).__name__} has no Hugging Face layout")
    return task


def bert_map(config: BertConfig, task: str = "base", pooler: bool | None = None) -> WeightMap:
    """The name map between our ``task`` model and the matching Hugging Face class
    (``BertModel``, ``RobertaForMaskedLM``, ``AlbertForPreTraining``, ...).

    ``pooler`` says whether the encoder holds one; by default as the task model builds it.
    """
    if task not in TASKS:
        raise LmarchError(f"unknown task {task!r}; one of {TASKS}")
    if pooler is None:
        if task == "base":
            pooler = config.add_pooler
        elif task == "sequence_classification":
            pooler = config.variant in ("bert", "albert")
        else:
            pooler = task == "pretraining" and config.variant == "albert"
    if task == "base":
        return WeightMap(encoder_rules(config, pooler=pooler), ignore=_ALIASES)
    rules = encoder_rules(config, "bert.", config.variant + ".", pooler)
    return WeightMap(rules + _head_rules(config, task), ignore=_ALIASES)


def map_for_model(model: nn.Module) -> WeightMap:
    """The name map for one of our BERT-family models, as it was built."""
    task = task_of(model)
    encoder = model if task == "base" else model.bert
    return bert_map(model.config, task, pooler=encoder.pooler is not None)


# How each config.json field of the four families is treated (see HFConfigFields).
BERT_FIELDS = HFConfigFields(
    "BERT-family",
    implemented=(
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
        "layer_norm_eps", "pad_token_id", "embedding_size", "num_hidden_groups",
        "tie_word_embeddings",  # False is refused where a head uses the word embeddings
    ),
    inert=(
        *(k for k in COMMON_INERT if k != "pad_token_id"),
        "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
        "classifier_dropout_prob",  # dropout: training only
        "summary_type", "summary_use_proj", "summary_activation", "summary_last_dropout",
    ),
    refused={
        "is_decoder": (False,),  # True makes transformers' encoder causal
        "position_embedding_type": ("absolute",),
        "inner_group_num": (1,),
    },
)  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> BertConfig:
    """Our BertConfig from a transformers Bert/Roberta/Albert/ElectraConfig dict."""
    kind = hf.get("model_type", "bert")
    if kind not in _STEMS:
        raise LmarchError(
            f"model_type {kind!r} is not a BERT-family model", hint=f"one of {sorted(_STEMS)}"
        )
    BERT_FIELDS.check(hf)
    act = hf.get("hidden_act", "gelu_new" if kind == "albert" else "gelu")
    if act not in _ACT_FROM_HF:
        raise LmarchError(f"unsupported {kind} activation {act!r}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmarchError(
            f"only absolute position embeddings are supported, not {hf['position_embedding_type']!r}"
        )
    hidden = hf["hidden_size"]
    embedding_size, groups = None, None
    if kind == "albert":
        if hf.get("inner_group_num", 1) != 1:
            raise LmarchError("ALBERT with inner_group_num != 1 is not supported")
        embedding_size = hf.get("embedding_size", 128)
        groups = hf.get("num_hidden_groups", 1)
    elif kind == "electra":
        e = hf.get("embedding_size", 128)
        embedding_size = e if e != hidden else None
    return BertConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 512),
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hidden,
        intermediate_size=hf["intermediate_size"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_size=embedding_size,
        n_layer_groups=groups,
        variant=kind,
        activation=_ACT_FROM_HF[act],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        pad_token_id=hf.get("pad_token_id", 1 if kind == "roberta" else 0),
        add_pooler=kind != "electra",
    )


def config_to_hf(c: BertConfig, architecture: str, num_labels: int | None = None) -> dict[str, Any]:
    """A transformers config dict of model type ``c.variant`` for ``architecture``."""
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": c.variant,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.block_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "type_vocab_size": c.type_vocab_size,
        "hidden_act": _ACT_TO_HF[c.activation],
        "layer_norm_eps": c.layer_norm_eps,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    if c.variant == "albert":
        out.update(embedding_size=c.embedding_dim, num_hidden_groups=c.n_blocks, inner_group_num=1)
    elif c.variant == "electra":
        out["embedding_size"] = c.embedding_dim
    elif c.embedding_size is not None:
        raise LmarchError(f"the Hugging Face {c.variant} layout has no factorised embedding")
    if c.variant != "albert" and c.n_layer_groups is not None:
        raise LmarchError(f"the Hugging Face {c.variant} layout has no layer sharing")
    if c.variant == "roberta":
        out.update(bos_token_id=0, eos_token_id=2)
    if num_labels is not None:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return out


def _task_from_architecture(name: str, kind: str) -> str:
    stem = _STEMS[kind]
    for task, suffix in _TASK_SUFFIX.items():
        if name == stem + suffix:
            return task
    raise LmarchError(
        f"architecture {name!r} is not supported",
        hint=f"one of {[stem + s for s in _TASK_SUFFIX.values()]}",
    )


def build_task_model(config: BertConfig, task: str, num_labels: int = 2) -> nn.Module:
    """Our model class for ``task`` (``pretraining`` is ELECTRA's or ALBERT's by variant), as
    :func:`lmarch.models.heads.build_bert_task_model` chooses it."""
    if task not in TASKS:
        raise LmarchError(f"unknown task {task!r}; one of {TASKS}")
    return build_bert_task_model(config, task, num_labels)


def load_hf_bert(folder: str | Path, task: str | None = None) -> nn.Module:
    """A BERT-family model holding the weights of a Hugging Face folder.

    ``task`` defaults to the one ``architectures`` names (``BertModel`` when absent). Asking for
    the bare encoder of a task checkpoint keeps the encoder and drops the heads.
    """
    hf = read_hf_config(folder)
    config = config_from_hf(hf)
    kind = config.variant
    archs = hf.get("architectures") or [_STEMS[kind] + "Model"]
    saved_task = _task_from_architecture(archs[0], kind)
    if task is None:
        # BERT's own pre-training checkpoints: the MLM head is kept, next-sentence head dropped
        no_pretraining_heads = saved_task == "pretraining" and kind in ("bert", "roberta")
        task = "masked_lm" if no_pretraining_heads else saved_task
    uses_word_embeddings = task == "masked_lm" or (task == "pretraining" and kind == "albert")
    if uses_word_embeddings and hf.get("tie_word_embeddings", True) is not True:
        raise LmarchError(
            f"{folder}: {kind} config field tie_word_embeddings={hf['tie_word_embeddings']!r} "
            "is not supported for a masked-LM head",
            hint="lmarch ties the masked-LM decoder to the word embeddings",
        )
    theirs = read_hf_weights(folder)
    prefix = kind + "."
    if task == "base":
        if any(k.startswith(prefix) for k in theirs):
            theirs = {k[len(prefix) :]: v for k, v in theirs.items() if k.startswith(prefix)}
        pooler_name = "pooler.weight" if kind == "albert" else "pooler.dense.weight"
        config = dataclasses.replace(config, add_pooler=pooler_name in theirs)
    num_labels = len(hf.get("id2label") or {0: 0, 1: 1})
    with empty_weights():  # the layout only: nothing is allocated before the file is checked
        model = build_task_model(config, task, num_labels=num_labels)
    # BERT's own checkpoints keep the next-sentence head and the pooler beside the MLM head
    ignore = [*_ALIASES, r"^cls\.seq_relationship\."]
    if (model if task == "base" else model.bert).pooler is None:
        ignore.append(r"(^|\.)pooler\.")
    if task != saved_task:
        ignore.append(".*")  # another task's checkpoint: take what this model needs, leave the rest
    weight_map = WeightMap(map_for_model(model).rules, ignore=ignore)
    tensors = weight_map.to_ours(theirs, config.n_blocks, where=str(folder))
    # built on the meta device and given the file's tensors once their names and shapes are
    # checked: a config.json that claims absurd sizes is refused, not allocated
    return build_from_weights(
        lambda: build_task_model(config, task, num_labels=num_labels), tensors, str(folder)
    )


def save_hf_bert(model: nn.Module, folder: str | Path) -> None:
    """Write one of our BERT-family models as a Hugging Face folder its transformers class loads."""
    c: BertConfig = model.config
    task = task_of(model)
    architecture = _STEMS[c.variant] + _TASK_SUFFIX[task]
    tensors = map_for_model(model).to_theirs(unique_state_dict(model), c.n_blocks)
    write_hf_folder(
        folder, config_to_hf(c, architecture, getattr(model, "num_labels", None)), tensors
    )


def read_sentence_transformers_pooling(folder: str | Path) -> dict[str, Any]:
    """How a sentence-transformers folder turns token states into one embedding:
    ``{"pooling": "mean" | "cls" | "max", "normalize": bool}`` from modules.json and the pooling
    module's config.json; ``{}`` for a folder that is not a sentence-transformers model."""
    folder = Path(folder)
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return {}
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        kinds = [(m.get("type", ""), m.get("path", "")) for m in modules]
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise LmarchError(f"{modules_path} is not a valid modules list: {exc}") from exc
    info: dict[str, Any] = {"normalize": any(t.endswith(".Normalize") for t, _ in kinds)}
    pooling_dirs = [p for t, p in kinds if t.endswith(".Pooling")]
    if not pooling_dirs:
        return info
    pool_path = folder / pooling_dirs[0] / "config.json"
    try:
        pool_cfg = json.loads(pool_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read pooling config {pool_path}: {exc}") from exc
    mode = pool_cfg.get("pooling_mode")  # newer sentence-transformers write the mode by name
    if mode is None:
        flags = {
            "cls": "pooling_mode_cls_token",
            "mean": "pooling_mode_mean_tokens",
            "max": "pooling_mode_max_tokens",
        }
        chosen = [m for m, key in flags.items() if pool_cfg.get(key)]
        if len(chosen) != 1 or pool_cfg.get("pooling_mode_mean_sqrt_len_tokens"):
            raise LmarchError(f"{pool_path}: only one of cls, mean or max pooling is supported")
        mode = chosen[0]
    if mode not in ("cls", "mean", "max"):
        raise LmarchError(f"{pool_path}: unsupported pooling mode {mode!r}")
    info["pooling"] = mode
    return info


__all__ = [
    "TASKS",
    "bert_map",
    "build_task_model",
    "config_from_hf",
    "config_to_hf",
    "encoder_rules",
    "load_hf_bert",
    "map_for_model",
    "read_sentence_transformers_pooling",
    "save_hf_bert",
    "task_of",
]
