"""LoRA layers: the equation, initialisation, exact merge/unmerge, only adapters training,
lmarch's native fast paths leaving LoRA layers to the reference forward, and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmarch import native
from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.peft import (
    LoRALinear,
    add_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    unmerge_lora,
)

ALL = r"blocks\.\d+\.(attn\.(qkv|out)|ffn\.(fc_in|fc_out))"


def _gpt(**overrides) -> GPT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("rslora", "scale"), [(False, 12 / 4), (True, 12 / 2)])
def test_forward_is_the_lora_equation(rslora, scale):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear.from_linear(base, rank=4, alpha=12, rslora=rslora)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    assert layer.scaling == scale
    # B = 0 at the start: the adapter is a no-op; A is Kaiming-uniform(a=sqrt(5)): |A| <= 1/sqrt(in)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert 0 < layer.lora_A.abs().max().item() <= 1 / math.sqrt(16)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16)
    want = F.linear(x, base.weight + scale * layer.lora_B @ layer.lora_A, base.bias)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear.from_linear(base, rank=4, alpha=4, dropout=0.5).train()
    x = torch.randn(4, 16)
    # B = 0: whatever dropout does to the adapter's input, the output is the base layer's
    assert torch.equal(layer(x), base(x))
    nn.init.normal_(layer.lora_B)
    torch.manual_seed(3)
    mask_in = F.dropout(torch.ones_like(x), 0.5, training=True)
    torch.manual_seed(3)
    got = layer(x)
    want = base(x) + F.linear(F.linear(x * mask_in, layer.lora_A), layer.lora_B)
    torch.testing.assert_close(got, want)


def test_model_state_dict_keeps_base_keys_and_adds_a_and_b():
    model = _gpt()
    before = set(model.state_dict())
    names = add_lora(model, r"blocks\.\d+\.attn\.qkv", rank=4)
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    added = set(model.state_dict()) - before
    assert added == {f"blocks.{i}.attn.qkv.lora_{p}" for i in range(2) for p in "AB"}
    assert before <= set(model.state_dict())
    assert type(model.blocks[0].attn.qkv) is not nn.Linear
    twin = copy.deepcopy(model)  # copies (and pickling) never call LoRALinear.__init__
    assert torch.equal(twin.blocks[1].attn.qkv.lora_A, model.blocks[1].attn.qkv.lora_A)


def test_merge_and_unmerge_are_exact():
    model = _gpt()
    add_lora(model, ALL, rank=8, alpha=16)
    _randomise_b(model)
    originals = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        assert all(m.merged for m in lora_layers(model).values())
        assert (merged - unmerged).abs().max().item() <= 1e-5
        assert not torch.equal(model.blocks[0].attn.qkv.weight, originals["blocks.0.attn.qkv"])
        unmerge_lora(model)
        assert (model(ids) - unmerged).abs().max().item() <= 1e-5
    for name, layer in lora_layers(model).items():
        assert (layer.weight - originals[name]).abs().max().item() <= 1e-6


def test_only_adapters_train_and_the_loss_falls():
    model = _gpt()
    add_lora(model, ALL, rank=4, alpha=8)
    n = mark_only_lora_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{p}" for m in lora_layers(model) for p in "AB"}
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids = _ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


@pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here: accelerate is the identity",
)
@pytest.mark.parametrize("lora_first", [True, False])
def test_accelerated_gpt_with_lora_matches_the_reference(lora_first):  # type: ignore[no-untyped-def]
    from lmarch.native import accelerate
    from lmarch.native.swaps import native_modules

    reference = _gpt()
    add_lora(reference, ALL, rank=4)
    _randomise_b(reference)
    fast = _gpt()
    if lora_first:
        add_lora(fast, ALL, rank=4)
        accelerate(fast, training=True)
        # a block whose projections carry LoRA is not fused
        assert native_modules(fast)["NativeGPTBlock"] == 0
    else:
        accelerate(fast, training=True)
        assert native_modules(fast)["NativeGPTBlock"] == 2
        add_lora(fast, ALL, rank=4)  # late: the per-call check runs the reference block
    fast.load_state_dict(reference.state_dict())
    ids = _ids()
    with torch.no_grad():
        assert (fast(ids) - reference(ids)).abs().max().item() <= 1e-5
        assert (fast(ids) - _gpt()(ids)).abs().max().item() > 1e-3


def test_a_pattern_matching_nothing_is_refused():
    with pytest.raises(LmarchError, match=r"matches no Linear layer"):
        add_lora(_gpt(), r"blocks\.\d+\.attn\.q_proj")
    with pytest.raises(LmarchError, match=r"LoRA target pattern .* is not a regular expression"):
        add_lora(_gpt(), r"blocks\.(")


def test_a_rank_larger_than_the_layer_is_refused():
    with pytest.raises(LmarchError, match=r"rank 65 is larger than layer 'blocks.0.attn.out'"):
        add_lora(_gpt(), r"blocks\.0\.attn\.out", rank=65)


def test_a_tied_head_and_a_second_adapter_are_refused():
    model = _gpt()
    with pytest.raises(LmarchError, match="shares its weight with another layer"):
        add_lora(model, "lm_head")
    add_lora(model, r"blocks\.0\.attn\.out", rank=2)
    with pytest.raises(LmarchError, match="already has a LoRA adapter"):
        add_lora(model, r"blocks\.0\.attn\.out", rank=2)
    with pytest.raises(LmarchError, match="no LoRA adapters to train"):
        mark_only_lora_trainable(_gpt())
