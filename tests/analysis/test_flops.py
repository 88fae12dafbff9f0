"""FLOP and parameter accounting against PyTorch's FlopCounterMode and published counts,
for every preset, on the meta device (the 7B / 8B shapes included, nothing allocated)."""

from __future__ import annotations

import functools

import pytest
import torch

from lmarch.analysis.flops import count_forward_flops, measure_flops
from lmarch.analysis.inspect import embedding_parameters, inspect_model, module_tree, render
from lmarch.models.registry import PRESETS, build_model, preset_config
from lmarch.nn.init import empty_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, BATCH = 16, 2


@functools.cache
def _meta(name: str) -> torch.nn.Module:
    """Preset ``name`` built once on the meta device (shapes only) and shared by the tests
    that only read it."""
    with empty_weights():
        return build_model(PRESETS[name].config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_forward_flops_equal_flop_counter_mode(name: str) -> None:
    """Our per-family sums count the same matrix products PyTorch dispatches: equal to the
    FLOP (the issue allows 5%)."""
    model = _meta(name)
    assert next(model.parameters()).device.type == "meta"
    config = PRESETS[name].config
    measured = measure_flops(model, config, SEQ, BATCH)
    counted = count_forward_flops(config, SEQ, BATCH).forward
    assert counted == measured
    if name != "bigram-char":  # a table lookup has no products at all
        assert measured > 0


@pytest.mark.parametrize(
    "name", ["gpt-char-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "bart-tiny", "lstm-char-tiny"]
)
def test_training_flops_are_three_forwards_within_5_percent(name: str) -> None:
    """Forward + backward under FlopCounterMode against 3 x our forward (Kaplan's 6N)."""
    with empty_weights():
        model = build_model(PRESETS[name].config)  # its own: backward leaves gradients
    config = PRESETS[name].config
    measured = measure_flops(model, config, SEQ, BATCH, backward=True)
    counted = count_forward_flops(config, SEQ, BATCH).training
    assert abs(counted - measured) / measured < 0.05


def test_attention_term_is_the_difference_between_sequence_lengths() -> None:
    """Per token, doubling T adds exactly 4 L d_attn T FLOPs (the scores and the weighted sum)
    and nothing else (Chinchilla, appendix F)."""
    config = PRESETS["gpt2"].config
    short = count_forward_flops(config, 256).forward_per_token
    long = count_forward_flops(config, 512).forward_per_token
    assert long - short == 4 * 12 * 768 * 256


# parameter counts published for these shapes (Hugging Face model cards / papers)
PUBLISHED = {
    "gpt2": 124_439_808,  # GPT2LMHeadModel, tied head
    "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616,  # meta-llama/Llama-2-7b-hf
    "llama3-8b": 8_030_261_248,  # meta-llama/Meta-Llama-3-8B
    "smollm2-135m": 134_515_008,  # HuggingFaceTB/SmolLM2-135M
    "bert-base": 109_482_240,  # BertModel with pooler
    "t5-small": 60_506_624,  # T5ForConditionalGeneration
    "minilm-l6": 22_713_216,  # all-MiniLM-L6-v2
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_published(name: str) -> None:
    assert sum(p.numel() for p in _meta(name).parameters()) == PUBLISHED[name]


def test_inspect_report_numbers() -> None:
    """The report of a real model's shape: exact counts, FLOPs beside FlopCounterMode's, and
    the KV cache and weights by hand (30 layers x 2 x 3 KV heads x 64 x 2 bytes)."""
    report = inspect_model("smollm2-135m", seq_len=64, precision="bf16")
    assert report.params == PUBLISHED["smollm2-135m"]
    assert report.embedding_params == 49152 * 576
    assert report.forward_flops_per_token == report.measured_forward_flops_per_token
    assert report.training_flops_per_token == 3 * report.forward_flops_per_token
    assert report.six_n_per_token == 6 * (PUBLISHED["smollm2-135m"] - 49152 * 576)
    assert report.attention_term_per_token == 12 * 30 * 64 * 576
    assert report.kv_cache_bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert report.memory.weights == 2 * report.params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tree_rows_add_up_to_the_total(name: str) -> None:
    """The top level of the module tree counts every parameter once (tied ones included)."""
    model = _meta(name)
    rows = module_tree(model)
    total = sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in rows if r.depth == 0) == total
    assert 0 <= embedding_parameters(model) <= total


@pytest.mark.parametrize("name", ["bigram-char", "lstm-char-tiny", "t5-tiny", "bert-tiny"])
def test_report_renders_for_models_without_attention_or_flops(name: str) -> None:
    text = render(inspect_model(name, seq_len=8))
    assert f"{name} — " in text and "training total" in text
    assert ("per target token" in text) == (name == "t5-tiny")


def test_tied_head_is_marked_and_counted_once() -> None:
    rows = {r.path: r for r in module_tree(_meta("smollm2-135m"))}
    assert rows["lm_head"].params == 0 and rows["lm_head"].note == "tied"
    assert rows["tok_emb"].params == 49152 * 576
    assert rows["blocks"].note == "x 30"
    assert rows["blocks.0.attn.qkv"].params == 576 * (9 + 2 * 3) * 64


def test_inspect_report_of_a_changed_shape() -> None:
    """A config changed from outside (ALBERT's shared block) is counted as it runs."""
    config = preset_config("albert-base-v2")
    flops = count_forward_flops(config, 8)
    per_layer = flops.parts["encoder feed-forward"] / config.n_layer
    assert per_layer == 2 * 8 * 768 * 3072 * 2  # every one of the 12 layers runs the shared FFN
