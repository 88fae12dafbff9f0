"""LoRA over lmarch's weight-only quantised layers: the adapter adds to the quantised layer's
output exactly, only A and B train, merging is refused, and the adapter saves/loads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmarch import native
from lmarch.errors import LmarchError
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.peft import (
    QuantLoRALinear,
    add_lora,
    load_adapter,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
)
from lmarch.quant.apply import quantize_

ALL = r"blocks\.\d+\.(attn\.(qkv|out)|ffn\.(fc_in|fc_out))"


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("scheme", ["int8", "int4", "q8", "q4"])
def test_adapter_on_a_quantised_layer(scheme):  # type: ignore[no-untyped-def]
    model = quantize_(_gpt(), scheme, skip=lambda name, m: name == "lm_head")
    ids = _ids()
    with torch.no_grad():
        quantised = model(ids)
    add_lora(model, ALL, rank=4, alpha=8)
    layers = lora_layers(model)
    assert len(layers) == 8 and all(type(m) is QuantLoRALinear for m in layers.values())
    with torch.no_grad():
        assert torch.equal(model(ids), quantised)  # B = 0: the quantised model unchanged
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        assert (model(ids) - quantised).abs().max().item() > 1e-3
        layer = layers["blocks.1.ffn.fc_in"]
        x = torch.randn(3, 7, 64, generator=g)
        want = layer.base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.0  # s = 8 / 4
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(LmarchError, match="cannot be merged exactly"):
        merge_lora(model)


def test_only_adapters_train_over_int8_and_the_adapter_round_trips(tmp_path):  # type: ignore[no-untyped-def]
    model = quantize_(_gpt(), "int8", skip=lambda name, m: name == "lm_head")
    add_lora(model, ALL, rank=4, alpha=8)
    mark_only_lora_trainable(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids = _ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    model.eval()
    save_adapter(model, tmp_path / "a")
    again = quantize_(_gpt(), "int8", skip=lambda name, m: name == "lm_head")
    load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here: accelerate is the identity",
)
def test_native_inference_blocks_and_lora():
    """LoRA before accelerate(training=False): the Q4_1 LLaMA layers are not swapped and cached
    decoding equals the reference; LoRA added after it wraps the swapped blocks' layers, their
    per-call check sees it, and they decode as the reference too."""
    from lmarch.native import accelerate
    from lmarch.native.swaps import native_modules

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=128,
    )
    base = quantize_(Llama(cfg).eval(), "q4", skip=lambda name, m: name == "lm_head")
    pattern = r"blocks\.\d+\.(attn\.(qkv|out)|ffn\.(gate_up|down))"
    late = copy.deepcopy(base)
    accelerate(late, training=False)
    assert native_modules(late)["NativeDecoderBlock"] == 2
    add_lora(late, pattern, rank=4)
    add_lora(base, pattern, rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(base).values():
            nn.init.normal_(layer.lora_B, std=0.1)
    late.load_state_dict(base.state_dict())
    fast = accelerate(copy.deepcopy(base), training=False)
    assert native_modules(fast)["NativeDecoderBlock"] == 0
    assert native_modules(fast)["NativeSwiGLU"] == 0
    ids = _ids()[:1, :6]
    outs = []
    for model in (base, fast, late):
        cache = model.make_cache(1, 32)
        with torch.no_grad():
            model(ids[:, :5], cache=cache, start=0)
            outs.append(model(ids[:, 5:], cache=cache, start=5))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    assert (outs[0] - outs[2]).abs().max().item() <= 1e-5
