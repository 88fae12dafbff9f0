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


def test_attention_scalings_and_untied_head_round_trip(tmp_path) -> None:
    """GPT-2's scale_attn_weights=False and scale_attn_by_inverse_layer_idx=True change the
    logits (by far more than the tolerance), lmarch follows them, and save_hf_gpt2 writes both
    flags and an untied lm_head that transformers reads back with the same logits."""
    torch.manual_seed(7)
    flags = dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    hf_config = transformers.GPT2Config(**CONFIGS["small"], **flags, tie_word_embeddings=False)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 0.5)  # an untied head with weights of its own
        for block in hf.transformer.h:  # scores well away from 0, so their scale shows
            block.attn.c_attn.weight.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "theirs")
    ours = load_hf_gpt2(tmp_path / "theirs").eval()
    assert [b.attn.softmax_scale for b in ours.blocks] == [1.0, 0.5]
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        default = {k: v for k, v in hf_config.to_dict().items() if k not in flags}
        plain = GPT(gpt_config_from_hf(default))
        plain.load_state_dict(ours.state_dict())
        plain.eval()
        assert (plain(ids) - expected).abs().max().item() > 0.5  # the flags matter
    save_hf_gpt2(ours, tmp_path / "ours")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert not again.config.tie_word_embeddings and again.config.scale_attn_by_inverse_layer_idx
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max().item() <= 1e-5
