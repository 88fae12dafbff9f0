"""lmarch.native.accelerate: what it swaps (the policy's structural checks), that the swapped
model is the same model (parameters, state dict, outputs), that each kernel is taken on exactly
the calls it was taken on before the swap moved out of lmarch/nn, and second derivatives."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmarch import native
from lmarch.models import GPT
from lmarch.models.gpt import GPTConfig
from lmarch.native import accelerate
from lmarch.native import activations as native_activations
from lmarch.native import attention as native_attention
from lmarch.native import gpt_block as native_block
from lmarch.native.swaps import native_modules
from lmarch.quant.apply import quantize_

pytestmark = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0): accelerate is the identity (tests/native/test_native_off.py)",
)


def _gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    return GPT(GPTConfig(**{**config, **overrides}))


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """How many times each kernel ran: the fused block, packed attention, the GELU."""
    seen = {"block": 0, "attention": 0, "gelu": 0}

    def counted(module, name: str, key: str) -> None:  # type: ignore[no-untyped-def]
        real = getattr(module, name)

        def wrapper(*args):  # type: ignore[no-untyped-def]
            seen[key] += 1
            return real(*args)

        monkeypatch.setattr(module, name, wrapper)

    counted(native_block, "gpt_block", "block")
    counted(native_attention, "packed_causal_attention", "attention")
    counted(native_activations, "native_gelu_tanh", "gelu")
    return seen


def test_a_gpt_is_swapped_in_place_with_its_parameters_and_state_dict() -> None:
    model = _gpt()
    reference = copy.deepcopy(model)
    params = {name: id(p) for name, p in model.named_parameters()}
    assert accelerate(model, training=True) is model
    assert native_modules(model) == {"NativeGPTBlock": 2, "NativeCausalAttention": 2, "gelu": 2}
    assert {name: id(p) for name, p in model.named_parameters()} == params
    assert list(model.state_dict()) == list(reference.state_dict())
    accelerate(model, training=False)  # twice, and for inference: nothing more to swap
    assert native_modules(model) == {"NativeGPTBlock": 2, "NativeCausalAttention": 2, "gelu": 2}
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(1))
    assert (model(ids) - reference(ids)).abs().max().item() <= 1e-5


def test_kernels_run_on_the_calls_they_took_before(calls) -> None:
    """Training and a prompt: one fused call a block (attention and GELU inside it); a prompt
    over a cache: the module path, with GELU on its kernel (3 x 20 x 256 elements); one-token
    steps and autocast: the module path alone."""
    model = accelerate(_gpt(), training=True)
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(1))
    model(ids).sum().backward()
    assert calls == {"block": 2, "attention": 0, "gelu": 0}
    with torch.no_grad():
        model.eval()(ids)
        assert calls["block"] == 4
        cache = model.make_cache(3, 32)
        model(ids, cache=cache, start=0)
        assert calls == {"block": 4, "attention": 0, "gelu": 2}
        model(ids[:, :1], cache=cache, start=20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
    assert calls == {"block": 4, "attention": 0, "gelu": 2}


class _LoRALinear(nn.Module):
    """A LoRA-wrapped Linear (Hu et al. 2021): W x + (alpha / r) B A x."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


def test_lora_wrapped_linears_are_not_fused_but_attention_and_gelu_still_are(calls) -> None:
    """A block with a LoRA projection is not swapped (the fused call would skip the adapter);
    its attention's kernel (between the projections) and its GELU still are."""
    model = _gpt(n_embd=128)
    for block in model.blocks:
        block.attn.qkv = _LoRALinear(block.attn.qkv)
    reference = copy.deepcopy(model)
    accelerate(model, training=True)
    assert native_modules(model) == {"NativeCausalAttention": 2, "gelu": 2}
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(1))
    got = model(ids)
    assert calls == {"block": 0, "attention": 2, "gelu": 2}  # 3 x 20 x 512 >= 4096 elements
    assert (got - reference(ids)).abs().max().item() <= 1e-5


def test_an_adapter_injected_after_the_swap_is_not_skipped(calls) -> None:
    model = accelerate(_gpt(), training=True)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    for block in model.blocks:
        block.ffn.fc_in = _LoRALinear(block.ffn.fc_in)
    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.__class__ = native_block.TransformerBlock
    assert (model(ids) - reference(ids)).abs().max().item() <= 1e-5
    assert calls["block"] == 0  # the per-call check saw the adapter


def test_quantised_and_rescaled_models_keep_their_reference_blocks() -> None:
    q8 = _gpt()
    quantize_(q8, "q8")
    accelerate(q8, training=True)
    assert native_modules(q8)["NativeGPTBlock"] == 0  # block-quantised projections
    # GPT-2's scale_attn_weights=False: a softmax scale the kernels do not compute
    unscaled = accelerate(_gpt(scale_attn_weights=False), training=True)
    assert native_modules(unscaled) == {"gelu": 2}


def _gradient_penalty(model: GPT, ids: torch.Tensor, targets: torch.Tensor):  # type: ignore[no-untyped-def]
    """|d loss / d params|^2 (a gradient penalty) and its gradient w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    penalty.backward()
    return penalty.item(), [p.grad.double() for p in params]


def test_second_derivatives_through_an_accelerated_gpt_equal_the_reference() -> None:
    """create_graph=True through the fused blocks in training mode: the penalty and its gradient
    equal the reference model's (attention written out: PyTorch's CPU SDPA has no second
    derivative) in float64, <= 1e-5 relative (measured ~7e-7)."""
    reference = _gpt(attention="reference").train()
    fast = _gpt().train()
    fast.load_state_dict(reference.state_dict())
    accelerate(fast, training=True)
    assert native_modules(fast)["NativeGPTBlock"] == 2
    g = torch.Generator().manual_seed(2)
    ids, targets = torch.randint(0, 50, (4, 24), generator=g), torch.randint(0, 50, (4, 24))
    want, want_grads = _gradient_penalty(reference.double(), ids, targets)
    got, got_grads = _gradient_penalty(fast, ids, targets)
    assert math.isclose(got, want, rel_tol=1e-5)
    for name, a, b in zip(dict(fast.named_parameters()), got_grads, want_grads, strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, name


def test_compiled_decoding_of_an_accelerated_gpt_compiles_as_the_reference_does() -> None:
    """What the loader sets up for a float GPT: accelerate(training=False), then a compiled
    decode step (the swapped blocks take their reference path there): as many graphs as the
    reference model compiles to (the swap adds no break or recompile) and the same 10 greedy
    tokens as eager."""
    import torch._dynamo

    from lmarch.generation.generate import iter_tokens

    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(3))
    tokens, graphs = [], []
    for fast in (False, True):
        model = _gpt().eval()
        if fast:
            accelerate(model, training=False)
            assert native_modules(model)["NativeGPTBlock"] == 2
        eager = [int(t) for t in iter_tokens(model, ids, 10)]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = [int(t) for t in iter_tokens(model, ids, 10, compile=True)]
        assert compiled == eager
        tokens.append(compiled)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert tokens[0] == tokens[1] and graphs[0] == graphs[1]
