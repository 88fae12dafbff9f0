"""Model families (one file each) and the preset registry."""

from lmarch.models.bart import Bart, BartConfig
from lmarch.models.bert import (
    AlbertForPreTraining,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    ElectraForPreTraining,
)
from lmarch.models.bigram import BigramConfig, BigramLM
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.models.registry import (
    FAMILIES,
    PRESETS,
    Preset,
    build_model,
    config_from_dict,
    config_to_dict,
    count_parameters,
    get_preset,
    make_config,
    preset_config,
)
from lmarch.models.rnn import RecurrentLM, RNNConfig
from lmarch.models.t5 import T5, T5Config
from lmarch.models.transformer import Transformer, TransformerConfig

__all__ = [
    "FAMILIES",
    "GPT",
    "PRESETS",
    "AlbertForPreTraining",
    "Bart",
    "BartConfig",
    "BertConfig",
    "BertForMaskedLM",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BigramConfig",
    "BigramLM",
    "ElectraForPreTraining",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "Preset",
    "RNNConfig",
    "RecurrentLM",
    "T5",
    "T5Config",
    "Transformer",
    "TransformerConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "count_parameters",
    "get_preset",
    "make_config",
    "preset_config",
]
