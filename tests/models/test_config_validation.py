"""Config dataclasses refuse values outside their range where they are set, naming the field
and the valid range (one line on the command line), instead of failing later."""

from __future__ import annotations

import pytest

from lmarch.errors import LmarchError
from lmarch.models import BertConfig, GPTConfig, LlamaConfig
from lmarch.models.validate import ConfigError

TINY = {
    GPTConfig: dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32),
    LlamaConfig: dict(
        vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, intermediate_size=48
    ),
    BertConfig: dict(
        vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, intermediate_size=48
    ),
}

# (config class, overrides, the exact message)
BAD = [
    (GPTConfig, dict(n_layer=-1), "GPTConfig.n_layer must be an integer >= 1, got -1"),
    (GPTConfig, dict(n_layer=0), "GPTConfig.n_layer must be an integer >= 1, got 0"),
    (GPTConfig, dict(n_layer=2.5), "GPTConfig.n_layer must be an integer >= 1, got 2.5"),
    (GPTConfig, dict(block_size=0), "GPTConfig.block_size must be an integer >= 1, got 0"),
    (GPTConfig, dict(vocab_size=0), "GPTConfig.vocab_size must be an integer >= 1, got 0"),
    (
        GPTConfig,
        dict(n_head=3),
        "GPTConfig.n_embd (32) must be a multiple of n_head (3), got remainder 2",
    ),
    (GPTConfig, dict(dropout=2), "GPTConfig.dropout must be in [0, 1), got 2"),
    (GPTConfig, dict(dropout=1.0), "GPTConfig.dropout must be in [0, 1), got 1.0"),
    (GPTConfig, dict(dropout=-0.1), "GPTConfig.dropout must be in [0, 1), got -0.1"),
    (GPTConfig, dict(layer_norm_eps=0.0), "GPTConfig.layer_norm_eps must be a number > 0, got 0.0"),
    (GPTConfig, dict(n_inner=0), "GPTConfig.n_inner must be an integer >= 1, got 0"),
    (GPTConfig, dict(bias="yes"), "GPTConfig.bias must be true or false, got 'yes'"),
    (
        GPTConfig,
        dict(activation="swish"),
        "GPTConfig.activation must be one of ['gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu', 'tanh'], "
        "got 'swish'",
    ),
    (LlamaConfig, dict(n_layer=0), "LlamaConfig.n_layer must be an integer >= 1, got 0"),
    (
        LlamaConfig,
        dict(n_kv_head=3),
        "LlamaConfig.n_head (4) must be a multiple of n_kv_head (3), got remainder 1",
    ),
    (LlamaConfig, dict(n_kv_head=0), "LlamaConfig.n_kv_head must be an integer >= 1, got 0"),
    (LlamaConfig, dict(rope_theta=-1.0), "LlamaConfig.rope_theta must be a number > 0, got -1.0"),
    (
        LlamaConfig,
        dict(head_dim=5),
        "LlamaConfig: the rotary width head_dim * partial_rotary_factor = 5 must be an even "
        "number >= 2",
    ),
    (
        LlamaConfig,
        dict(rope_scaling={"type": "longrope", "factor": 2.0}),
        "LlamaConfig.rope_scaling: RoPE scaling type 'longrope' is not supported; one of "
        "['default', 'dynamic', 'factors', 'linear', 'llama3', 'ntk', 'yarn']",
    ),
    (
        LlamaConfig,
        dict(rope_scaling={"type": "linear", "factor": 0}),
        "LlamaConfig.rope_scaling: factor must be a number > 0, got 0",
    ),
    (
        LlamaConfig,
        dict(rope_scaling={"type": "linear", "factor": 2.0, "beta_fast": 3}),
        "LlamaConfig.rope_scaling: key 'beta_fast' is not used by RoPE scaling 'linear'",
    ),
    (LlamaConfig, dict(dropout=2), "LlamaConfig.dropout must be in [0, 1), got 2"),
    (BertConfig, dict(n_layer=-1), "BertConfig.n_layer must be an integer >= 1, got -1"),
    (
        BertConfig,
        dict(n_head=3),
        "BertConfig.n_embd (32) must be a multiple of n_head (3), got remainder 2",
    ),
    (BertConfig, dict(dropout=2), "BertConfig.dropout must be in [0, 1), got 2"),
    (
        BertConfig,
        dict(variant="xlnet"),
        "BertConfig.variant must be one of ['bert', 'roberta', 'albert', 'electra'], got 'xlnet'",
    ),
    (
        BertConfig,
        dict(n_layer_groups=3),
        "BertConfig.n_layer_groups must be in 1..n_layer (2), got 3",
    ),
    (
        BertConfig,
        dict(pad_token_id=50),
        "BertConfig.pad_token_id must be in 0..vocab_size-1 (49), got 50",
    ),
    (
        BertConfig,
        dict(variant="roberta", pad_token_id=15),
        "BertConfig.block_size must exceed pad_token_id + 1 (16) for RoBERTa, got 16",
    ),
]


@pytest.mark.parametrize(("cls", "overrides", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_value_is_refused_with_its_range(cls: type, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**{**TINY[cls], **overrides})
    assert str(info.value) == message
    assert info.value.field is not None and info.value.field in message
    # the command line turns an LmarchError into one line and exit 2; ValueError for callers
    # that check dataclass arguments the usual way
    assert isinstance(info.value, LmarchError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("cls", list(TINY))
def test_the_edges_of_each_range_are_accepted(cls: type) -> None:
    """The checks are not stricter than their messages: the paper defaults and the edge values
    (one layer, the narrowest heads, dropout 0 and 0.999) build. LLaMA's heads must hold at
    least one rotated pair, so they are 2 wide; the others' may be 1."""
    n_head = 16 if cls is LlamaConfig else 32
    edges = dict(n_layer=1, n_head=n_head, dropout=0.999)
    config = cls(**{**TINY[cls], **edges})
    assert (config.n_layer, config.n_head, config.dropout) == (1, n_head, 0.999)
    assert cls().n_layer >= 1 and cls(**{**TINY[cls], "dropout": 0.0}).dropout == 0.0
