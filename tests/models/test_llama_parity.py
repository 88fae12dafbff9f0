"""Parity of lmarch's LLaMA with transformers' LlamaForCausalLM holding the same random weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmarch.generation import generate
from lmarch.models import Llama
from lmarch.weights.hf_llama import llama_config_from_hf, llama_map, load_hf_llama, save_hf_llama

CONFIGS = {
    "mha": dict(
        vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    ),
    "gqa_tied": dict(
        vocab_size=131, hidden_size=96, intermediate_size=224, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "mqa_llama3_rope": dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        },
    ),
    "linear_rope": dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
    # 100-token inputs and 47-token generations run past max_position_embeddings: the base grows
    "dynamic_rope_biases": dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_scaling={"rope_type": "dynamic", "factor": 4.0},
        attention_bias=True, mlp_bias=True,
    ),
    "yarn_rope": dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
}  # fmt: skip


def make_pair(name: str, seed: int = 0) -> tuple[transformers.LlamaForCausalLM, Llama]:
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**CONFIGS[name])
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # RMSNorm gains start at 1; perturb them so the test sees them
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    config = llama_config_from_hf(hf_config.to_dict())
    ours = Llama(config).eval()
    theirs = dict(hf.state_dict())
    ours.load_state_dict(llama_map(config).to_ours(theirs, config.n_layer), strict=False)
    return hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_match(name: str) -> None:
    """Same logits (<= 1e-4) and gradients (<= 1e-5) over a 100-token batch."""
    hf, ours = make_pair(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 100), generator=g)
    targets = torch.randint(0, hf.config.vocab_size, ids.shape, generator=g)
    hf_logits, our_logits = hf(ids).logits, ours(ids)
    assert (hf_logits - our_logits).abs().max().item() <= 1e-4

    ce = torch.nn.functional.cross_entropy
    ce(hf_logits.flatten(0, 1), targets.flatten()).backward()
    ce(our_logits.flatten(0, 1), targets.flatten()).backward()
    grads = {k: p.grad for k, p in hf.named_parameters()}
    mapped = llama_map(ours.config).to_ours(grads, ours.config.n_layer)
    for k, p in ours.named_parameters():
        err = (p.grad - mapped[k]).abs().max().item()
        assert err <= 1e-5, f"gradient of {k} differs by {err}"


@pytest.mark.parametrize(
    "name", ["gqa_tied", "mqa_llama3_rope", "dynamic_rope_biases", "yarn_rope"]
)
def test_greedy_generation_equals_transformers(name: str) -> None:
    """40 greedy tokens with our static KV cache equal HF generate's."""
    hf, ours = make_pair(name, seed=4)
    prompt = torch.randint(
        0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(9)
    )
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=40,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(generate(ours, prompt, 40), expected)


def test_export_round_trips_and_loads_in_transformers(tmp_path) -> None:
    """save_hf_llama writes a folder transformers loads with identical logits; ours reloads it."""
    hf, ours = make_pair("gqa_tied", seed=2)
    save_hf_llama(ours, tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 131, (1, 60), generator=torch.Generator().manual_seed(3))
    assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    again = load_hf_llama(tmp_path).eval()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("name", ["dynamic_rope_biases", "yarn_rope"])
def test_export_keeps_biases_and_rope_scaling(tmp_path, name: str) -> None:
    """Biases and dynamic / YaRN scaling survive save_hf_llama: transformers reads the folder
    with the original model's logits (over a length past the original context)."""
    hf, ours = make_pair(name, seed=6)
    save_hf_llama(ours, tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["rope_type"] == hf.config.rope_parameters["rope_type"]
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    again = load_hf_llama(tmp_path).eval()
    assert again.config == ours.config
