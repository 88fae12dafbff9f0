"""The Flamingo adapter: closed tanh gates leave a frozen GPT's (and LLaMA's) logits exactly
unchanged, cached decoding included; training moves only the adapter; the perceiver resampler
gives a fixed number of visual tokens for any number of image features; misuse is refused."""

from __future__ import annotations

import pytest
import torch

from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.peft.flamingo import GatedBlock, PerceiverResampler, add_flamingo

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32)).eval()


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=32, intermediate_size=64)  # fmt: skip
    return Llama(config).eval()


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
def test_closed_gates_leave_the_frozen_lm_bit_for_bit_unchanged(make):
    model = make()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids)
    adapter = add_flamingo(model, vision_dim=24, n_latents=5, n_head=4)
    features = torch.randn(2, 17, 24)
    with adapter.attending(features) as visual:
        after = model(ids)
    assert visual.shape == (2, 5, 24)
    assert torch.equal(after, before)  # exactly: tanh(0) = 0 and x + 0 * f == x
    assert all(isinstance(b, GatedBlock) for b in model.blocks)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".xattn." not in n)


def test_opened_gates_change_the_output_and_cached_decoding_agrees():
    model = tiny_gpt()
    adapter = add_flamingo(model, vision_dim=16, n_head=2, every=2)
    assert len(adapter.xattn) == 2  # in front of blocks 0 and 2
    with torch.no_grad():
        for layer in adapter.xattn:
            layer.attn_gate.fill_(0.7)
            layer.ffn_gate.fill_(-0.3)
    ids = torch.randint(0, 50, (2, 6))
    features = torch.randn(2, 10, 16)
    with torch.no_grad(), adapter.attending(features):
        full = model(ids)
        cache = model.make_cache(2, 6)
        steps = torch.cat([model(ids[:, i : i + 1], cache=cache, start=i) for i in range(6)], 1)
    with torch.no_grad(), adapter.attending(None):
        blind = model(ids)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    assert (full - blind).abs().max() > 1e-3  # the image now reaches the logits


def test_a_training_step_moves_only_the_adapter():
    model = tiny_gpt()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = add_flamingo(model, vision_dim=16, n_head=2)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (4, 8))
    for _ in range(2):
        with adapter.attending(torch.randn(4, 10, 16)):
            loss = torch.nn.functional.cross_entropy(
                model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = model.state_dict()
    for name, value in frozen.items():
        wrapped = name.replace("blocks.0.", "blocks.0.block.").replace(
            "blocks.1.", "blocks.1.block."
        )
        wrapped = wrapped.replace("blocks.2.", "blocks.2.block.")
        assert torch.equal(state[wrapped], value), name
    assert all(abs(a) > 0 for a, _ in adapter.gates())  # the gates opened


def test_resampler_gives_a_fixed_number_of_tokens():
    torch.manual_seed(0)
    resampler = PerceiverResampler(dim=16, n_latents=6, n_layer=2, n_head=2)
    assert resampler(torch.randn(3, 5, 16)).shape == (3, 6, 16)
    assert resampler(torch.randn(1, 40, 16)).shape == (1, 6, 16)


def test_refusals():
    model = tiny_gpt()
    add_flamingo(model, vision_dim=16, n_head=2)
    with pytest.raises(LmarchError, match="already has Flamingo layers"):
        add_flamingo(model, vision_dim=16, n_head=2)
    with pytest.raises(LmarchError, match="has no 'blocks' list"):
        add_flamingo(torch.nn.Linear(2, 2), vision_dim=16)
    with pytest.raises(LmarchError, match="must divide the widths"):
        add_flamingo(tiny_gpt(), vision_dim=15, n_head=2)
