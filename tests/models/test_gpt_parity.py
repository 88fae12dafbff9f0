"""Parity of lmarch's GPT with transformers' GPT2LMHeadModel holding the same random weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmarch.models import GPT
from lmarch.weights.hf_gpt2 import GPT2_MAP, gpt_config_from_hf, load_hf_gpt2, save_hf_gpt2

CONFIGS = {
    "small": dict(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    "wider": dict(vocab_size=211, n_positions=128, n_embd=96, n_layer=3, n_head=6, n_inner=256),
}


def make_pair(name: str, seed: int = 0) -> tuple[transformers.GPT2LMHeadModel, GPT]:
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        **CONFIGS[name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPT(gpt_config_from_hf(hf_config.to_dict())).eval()
    theirs = {k: v for k, v in hf.state_dict().items()}
    ours.load_state_dict(GPT2_MAP.to_ours(theirs, ours.config.n_layer), strict=False)
    return hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_match(name: str) -> None:
    hf, ours = make_pair(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (3, hf.config.n_positions), generator=g)
    targets = torch.randint(0, hf.config.vocab_size, ids.shape, generator=g)

    hf_logits = hf(ids).logits
    our_logits = ours(ids)
    assert (hf_logits - our_logits).abs().max().item() <= 1e-4

    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(hf_logits.flatten(0, 1), targets.flatten()).backward()
    loss_fn(our_logits.flatten(0, 1), targets.flatten()).backward()
    their_grads = {k: p.grad for k, p in hf.named_parameters()}
    mapped = GPT2_MAP.to_ours(their_grads, ours.config.n_layer)
    for k, p in ours.named_parameters():
        err = (p.grad - mapped[k]).abs().max().item()
        assert err <= 1e-5, f"gradient of {k} differs by {err}"


def test_reference_attention_gives_same_logits() -> None:
    _, ours = make_pair("small")
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    fused = ours(ids)
    for block in ours.blocks:
        block.attn.implementation = "reference"
    assert (ours(ids) - fused).abs().max().item() <= 1e-5


def test_export_round_trips_and_loads_in_transformers(tmp_path) -> None:
    hf, ours = make_pair("wider", seed=5)
    save_hf_gpt2(ours, tmp_path)
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    reloaded_ours = load_hf_gpt2(tmp_path).eval()
    ids = torch.randint(0, 211, (2, 50), generator=torch.Generator().manual_seed(4))
    expected = hf(ids).logits
    assert (reloaded_hf(ids).logits - expected).abs().max().item() <= 1e-5
    assert (reloaded_ours(ids) - expected).abs().max().item() <= 1e-4
    for k, v in ours.state_dict().items():
        assert torch.equal(v, reloaded_ours.state_dict()[k]), k
