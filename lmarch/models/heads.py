"""Which model a family gets for a task: the one table every loader asks.

A task model is an encoder with a head (:class:`~lmarch.models.bert_heads.EncoderWithHead`);
``task`` names the head as the Hugging Face class names do (``masked_lm``,
``sequence_classification``, ...), plus ``pooled_classification`` for the classifier
``lmarch classify train`` fine-tunes. Each task also says what the model was trained to do,
its *objective* (``"masked-lm"``, ``"classifier"``, ...), which commands check before using it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.bert import (
    AlbertForPreTraining,
    BertConfig,
    BertForMaskedLM,
    BertForPooledClassification,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    ElectraForPreTraining,
)
from lmarch.models.bert_heads import EncoderWithHead

# what a model was trained to do; commands ask for one (lmarch.loading.LoadedModel.require)
CAUSAL_LM = "causal-lm"
MASKED_LM = "masked-lm"
REPLACED_TOKEN_DETECTION = "replaced-token-detection"
CLASSIFIER = "classifier"
TOKEN_CLASSIFIER = "token-classifier"
QUESTION_ANSWERING = "question-answering"
EMBEDDING = "embedding"
SEQ2SEQ = "seq2seq"  # an encoder-decoder: source text in, target text out (T5, BART)
OBJECTIVES = (
    CAUSAL_LM,
    MASKED_LM,
    REPLACED_TOKEN_DETECTION,
    CLASSIFIER,
    TOKEN_CLASSIFIER,
    QUESTION_ANSWERING,
    EMBEDDING,
    SEQ2SEQ,
)

Builder = Callable[[BertConfig, int], nn.Module]


def _pretraining(config: BertConfig, num_labels: int) -> nn.Module:
    if config.variant == "electra":
        return ElectraForPreTraining(config)
    if config.variant == "albert":
        return AlbertForPreTraining(config)
    raise LmarchError(f"no pre-training heads for the {config.variant} variant")


def _pooled(config: BertConfig, num_labels: int) -> nn.Module:
    return BertForPooledClassification(BertModel(config, add_pooler=False), num_labels)


# task -> (how to build it, its objective or None when it depends on the variant)
BERT_TASKS: dict[str, tuple[Builder, str | None]] = {
    "base": (lambda c, n: BertModel(c), EMBEDDING),
    "masked_lm": (lambda c, n: BertForMaskedLM(c), MASKED_LM),
    "sequence_classification": (BertForSequenceClassification, CLASSIFIER),
    "pooled_classification": (_pooled, CLASSIFIER),
    "token_classification": (BertForTokenClassification, TOKEN_CLASSIFIER),
    "question_answering": (lambda c, n: BertForQuestionAnswering(c), QUESTION_ANSWERING),
    "pretraining": (_pretraining, None),  # ELECTRA's discriminator or ALBERT's MLM + SOP
}
# a pre-training run's objective (lmarch train --objective) -> the task model it keeps
RUN_OBJECTIVES = {"clm": CAUSAL_LM, "mlm": MASKED_LM, "rtd": REPLACED_TOKEN_DETECTION}


def build_bert_task_model(config: BertConfig, task: str, num_labels: int = 2) -> nn.Module:
    """Our BERT-family model for ``task`` (see :data:`BERT_TASKS`)."""
    if task not in BERT_TASKS:
        raise LmarchError(f"unknown task {task!r}", hint=f"one of {sorted(BERT_TASKS)}")
    return BERT_TASKS[task][0](config, num_labels)


def bert_task_objective(config: BertConfig, task: str) -> str:
    """What a ``task`` model of this variant was trained to do (one of :data:`OBJECTIVES`)."""
    objective = BERT_TASKS[task][1]
    if objective is not None:
        return objective
    return REPLACED_TOKEN_DETECTION if config.variant == "electra" else MASKED_LM


# the other way round: which task a model of ours is (to name its Hugging Face class)
_TASK_OF_CLASS: dict[type[nn.Module], str] = {
    BertModel: "base",
    BertForMaskedLM: "masked_lm",
    BertForSequenceClassification: "sequence_classification",
    BertForPooledClassification: "pooled_classification",
    BertForTokenClassification: "token_classification",
    BertForQuestionAnswering: "question_answering",
    ElectraForPreTraining: "pretraining",
    AlbertForPreTraining: "pretraining",
}


def bert_task_of(model: nn.Module) -> str:
    """The task (a key of :data:`BERT_TASKS`) of one of our BERT-family model classes."""
    task = _TASK_OF_CLASS.get(type(model))
    if task is None:
        raise TypeError(f"{type(model).__name__} is not a BERT-family model")
    return task


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare encoder of a BERT-family model: the model itself, or the ``bert`` under a
    head."""
    return model.encoder if isinstance(model, EncoderWithHead) else model


__all__ = [
    "BERT_TASKS",
    "CAUSAL_LM",
    "CLASSIFIER",
    "EMBEDDING",
    "MASKED_LM",
    "OBJECTIVES",
    "QUESTION_ANSWERING",
    "REPLACED_TOKEN_DETECTION",
    "RUN_OBJECTIVES",
    "TOKEN_CLASSIFIER",
    "bert_task_objective",
    "bert_task_of",
    "build_bert_task_model",
    "encoder_of",
]
