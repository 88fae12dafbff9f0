"""Second derivatives through SDPA on the CPU.

PyTorch's CPU flash kernel has a backward without a derivative, so ``lmarch.nn.attention`` runs
it through ``sdpa_grad.CpuFlashAttention``. Checked here: first-order results equal plain
``F.scaled_dot_product_attention`` bit for bit; second derivatives equal the equation's
(float64); the wrapper stays out of inference and of ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lmarch.models.gpt import GPT, GPTConfig
from lmarch.nn import scaled_dot_product_attention

WRAPPED = "CpuFlashAttentionBackward"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _inputs(case: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    """q [2, 4, 7, 16]; k/v with 2 heads for 'gqa', else 4; a boolean mask for 'mask'."""
    h_kv = 2 if case == "gqa" else 4
    q = torch.randn(2, 4, 7, 16, dtype=dtype)
    k, v = torch.randn(2, 2, h_kv, 7, 16, dtype=dtype).unbind(0)
    return q, k, v


def _kwargs(case: str) -> dict:
    """lmarch's call for each case; a mask row that hides every key is included on purpose."""
    if case == "mask":
        mask = torch.rand(2, 1, 7, 7) > 0.4
        mask[0, 0, 3] = False
        return {"mask": mask}
    return {"is_causal": True, "scale": 0.37 if case == "scale" else None}


def _plain(q: Tensor, k: Tensor, v: Tensor, mask=None, is_causal=False, scale=None) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


CASES = ["causal", "mask", "gqa", "scale"]


@pytest.mark.parametrize("case", CASES)
def test_first_order_equals_plain_sdpa_exactly(case: str) -> None:
    q, k, v = (x.requires_grad_() for x in _inputs(case))
    kw = _kwargs(case)
    y = scaled_dot_product_attention(q, k, v, **kw)
    assert type(y.grad_fn).__name__ == WRAPPED
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), grad_out)
    y_plain = _plain(q, k, v, **kw)
    assert "FlashAttentionForCpu" in type(y_plain.grad_fn).__name__  # the oracle is the kernel
    grads_plain = torch.autograd.grad(y_plain, (q, k, v), grad_out)
    assert torch.equal(y, y_plain)
    for g, g_plain in zip(grads, grads_plain, strict=True):
        assert torch.equal(g, g_plain)


def _equation(q: Tensor, k: Tensor, v: Tensor, mask=None, is_causal=False, scale=None) -> Tensor:
    """softmax(q k^T * scale, masked) v in the inputs' precision (``reference_attention`` takes
    its softmax in float32, too coarse for a float64 oracle); a row that sees no key gives 0."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    return weights @ v


def _penalty_grads(attention, q: Tensor, k: Tensor, v: Tensor, kw: dict) -> tuple:
    """d/d(q, k, v) of sum(first-order gradient ** 2) for a fixed upstream gradient."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    y = attention(q, k, v, **kw)
    grad_out = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    first = torch.autograd.grad(y, (q, k, v), grad_out, create_graph=True)
    return torch.autograd.grad(sum((g**2).sum() for g in first), (q, k, v))


@pytest.mark.parametrize("case", CASES)
def test_second_order_equals_the_equation(case: str) -> None:
    # float64 (also run by the flash kernel) so the comparison is tight
    q, k, v = _inputs(case, torch.float64)
    kw = _kwargs(case)
    got = _penalty_grads(scaled_dot_product_attention, q, k, v, kw)
    want = _penalty_grads(_equation, q, k, v, kw)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-10)


def test_second_order_when_q_k_and_v_are_one_tensor() -> None:
    # each role's gradient must be its own, not the shared tensor's total
    x = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    penalties = []
    for attention in (scaled_dot_product_attention, _equation):
        q = x.clone().requires_grad_()
        y = attention(q, q, q, is_causal=True)
        (g,) = torch.autograd.grad(y.sum(), q, create_graph=True)
        penalties.append(torch.autograd.grad((g**2).sum(), q)[0])
    assert torch.allclose(penalties[0], penalties[1], rtol=1e-10, atol=1e-10)


def test_only_inputs_that_require_grad_get_one() -> None:
    q, k, v = _inputs("causal", torch.float64)
    q.requires_grad_()
    y = scaled_dot_product_attention(q, k, v, is_causal=True)
    (g,) = torch.autograd.grad(y.square().sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), q)
    q_ref = q.detach().clone().requires_grad_()
    y_ref = _equation(q_ref, k, v, is_causal=True)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), q_ref, create_graph=True)
    (h_ref,) = torch.autograd.grad(g_ref.square().sum(), q_ref)
    assert torch.allclose(h, h_ref, rtol=1e-10, atol=1e-10)


def test_no_wrapper_without_autograd_or_with_dropout() -> None:
    q, k, v = _inputs("causal")
    with torch.no_grad():
        assert (
            scaled_dot_product_attention(q.requires_grad_(), k, v, is_causal=True).grad_fn is None
        )
    y = scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
    assert type(y.grad_fn).__name__ != WRAPPED
    assert y.grad_fn is not None


def _tiny_gpt(attention: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=61,
        block_size=16,
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        attention=attention,
    )
    return GPT(config).train()


def test_gradient_penalty_through_a_float32_gpt_equals_the_reference_attention() -> None:
    idx = torch.randint(0, 61, (2, 12))
    results = []
    for attention in ("sdpa", "reference"):
        model = _tiny_gpt(attention)
        params = [p for p in model.parameters() if p.requires_grad]
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, dims=1).flatten())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, params))
    for got, want in zip(*results, strict=True):
        assert torch.linalg.vector_norm(got - want) <= 1e-5 * torch.linalg.vector_norm(want)


def test_compiled_gpt_equals_eager() -> None:
    # under torch.compile the wrapper steps aside (the compiled graph has its own backward)
    model = _tiny_gpt("sdpa")
    idx = torch.randint(0, 61, (2, 12))
    eager = model(idx)
    eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(idx)
    grads = torch.autograd.grad(compiled.square().mean(), list(model.parameters()))
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, g_eager in zip(grads, eager_grads, strict=True):
        assert torch.allclose(g, g_eager, rtol=1e-5, atol=1e-6)


def test_torch_func_grad_still_takes_plain_sdpa() -> None:
    # an autograd.Function would need its own functorch rules; under torch.func the wrapper
    # steps aside and first-order gradients are plain SDPA's, as before
    q, k, v = _inputs("causal")
    got = torch.func.grad(lambda q: scaled_dot_product_attention(q, k, v, is_causal=True).sum())(q)
    q.requires_grad_()
    (want,) = torch.autograd.grad(_plain(q, k, v, is_causal=True).sum(), q)
    assert torch.equal(got, want)
