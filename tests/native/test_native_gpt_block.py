"""The fused GPT-2 block (lmarch/native/gpt_block.py), swapped in by accelerate, against the
module path in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmarch import native
from lmarch.native import accelerate
from lmarch.native import gpt_block as fused
from lmarch.nn.attention import MultiHeadAttention
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cache import KVCache
from lmarch.nn.ffn import MLP
from lmarch.nn.norm import LayerNorm

pytestmark = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0)",
)

# float32 fused block against the float64 module path: |error| / max|exact| of the output, of
# dx and of every parameter's gradient; measured <= 8.1e-7 over these shapes
TOLERANCE = 1e-5


def _block(
    dim: int, heads: int, kv_heads: int, bias: bool, dropout: float = 0.0, act: str = "gelu_tanh"
):
    attn = MultiHeadAttention(dim, heads, n_kv_heads=kv_heads, bias=bias, dropout=dropout)
    ffn = MLP(dim, 4 * dim, activation=act, bias=bias, dropout=dropout)
    block = TransformerBlock(attn, ffn, LayerNorm(dim, bias=bias), LayerNorm(dim, bias=bias))
    return accelerate(block, training=True)


def _randomise(block: TransformerBlock) -> None:
    """Non-trivial LayerNorm gains and biases (they start at 1 and 0)."""
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))


def _run(block: TransformerBlock, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def _error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return ((ours.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the block's native calls."""
    seen: list[int] = []
    real = fused.gpt_block
    monkeypatch.setattr(fused, "gpt_block", lambda *a: seen.append(1) or real(*a))
    return seen


SHAPES = [  # (B, T, dim, heads, kv_heads, bias)
    (12, 64, 128, 4, 4, True),  # nanoGPT's CPU shape
    (2, 37, 96, 6, 2, True),  # grouped-query; T not a multiple of the kernels' tiles
    (3, 20, 64, 4, 4, False),  # no biases anywhere (nanoGPT's bias=False)
    (1, 2, 32, 2, 1, True),  # two tokens, multi-query
]


def test_torch_blas_is_found_where_torch_has_mkl() -> None:
    """The x86 wheels of PyTorch carry MKL; its sgemm must be found and pass the check, or the
    threaded block below would silently never run."""
    assert native.blas_ready() == (torch.backends.mkl.is_available() and native.native_available())


@pytest.mark.parametrize(
    "threaded", [True, False], ids=["sequences-per-thread", "pytorch-products"]
)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_block_equals_module_path_in_float64(shape, threaded, calls, monkeypatch) -> None:
    """Both ways of running the fused block: whole sequences per thread with the BLAS called
    from C (gpt_block.c; with B=1 one thread has no rows), and PyTorch's products in between
    lmarch's kernels."""
    monkeypatch.setattr(fused, "_threaded", lambda batch: threaded and native.blas_ready())
    b, t, dim, heads, kv_heads, bias = shape
    torch.manual_seed(0)
    block = _block(dim, heads, kv_heads, bias)
    _randomise(block)
    x, grad = torch.randn(b, t, dim), torch.randn(b, t, dim)
    y, dx, grads = _run(block, x, grad)
    assert calls == [1]  # the fused call ran
    y64, dx64, grads64 = _run(block.double(), x.double(), grad.double())
    assert calls == [1]  # float64 takes the module path
    assert _error(y, y64) <= TOLERANCE
    assert _error(dx, dx64) <= TOLERANCE
    assert grads.keys() == grads64.keys()
    for name, g in grads.items():
        assert _error(g, grads64[name]) <= TOLERANCE, name


def test_eval_and_no_grad_forward_is_the_same_function(calls) -> None:
    torch.manual_seed(1)
    block = _block(64, 4, 4, True, dropout=0.1).eval()  # dropout is off in eval
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        y = block(x)
    assert calls == [1]
    y64 = block.double()(x.double())
    assert _error(y, y64) <= TOLERANCE


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_graph_calls_the_operator_and_agrees(dropout, calls, monkeypatch) -> None:
    monkeypatch.setattr(fused, "draw_seed", lambda: torch.tensor(987654321))
    torch.manual_seed(2)
    block = _block(64, 4, 2, True, dropout=dropout)
    _randomise(block)
    x, grad = torch.randn(2, 24, 64), torch.randn(2, 24, 64)
    y, dx, grads = _run(block, x, grad)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x2 = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y2 = compiled(x2)
    y2.backward(grad)
    assert len(calls) == 2
    assert torch.allclose(y2, y, atol=1e-6, rtol=1e-5)
    assert torch.allclose(x2.grad, dx, atol=1e-6, rtol=1e-5)
    for name, p in block.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6, rtol=1e-5), name


def test_other_calls_keep_the_module_path(calls) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _block(64, 4, 4, True)(x)
    _block(64, 4, 4, True)(x, attention_mask=torch.ones(2, 1, 1, 8, dtype=torch.bool))
    with torch.no_grad():  # decoding
        _block(64, 4, 4, True).eval()(x, cache=KVCache(1, 2, 4, 16, 16), layer_index=0, start=0)
    hooked = _block(64, 4, 4, True)
    seen = []
    hooked.ffn.fc_in.register_forward_hook(lambda *a: seen.append(1))
    hooked(x)
    assert seen == [1]  # a hook on a part still runs
    _block(64, 4, 4, True, act="silu")(x)
    assert calls == []


def test_native_off_keeps_the_module_path(calls, monkeypatch) -> None:
    monkeypatch.setattr(native, "native_library", lambda: None)
    _block(64, 4, 4, True)(torch.randn(1, 8, 64))
    assert calls == []


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> object:
    return native.load(native.build([], tmp_path_factory.mktemp("kernels")))


def test_portable_c_path_agrees(portable, monkeypatch) -> None:
    """The same block through the kernels built without AVX2 (plain C loops)."""
    torch.manual_seed(4)
    block = _block(64, 4, 2, True)
    _randomise(block)
    x, grad = torch.randn(2, 21, 64), torch.randn(2, 21, 64)
    y, dx, grads = _run(block, x, grad)
    monkeypatch.setattr(fused, "native_library", lambda: portable)
    monkeypatch.setattr("lmarch.native.attention.native_library", lambda: portable)
    y2, dx2, grads2 = _run(block, x, grad)
    assert _error(y2, y.double()) <= TOLERANCE and _error(dx2, dx.double()) <= TOLERANCE
    for name, g in grads.items():
        assert _error(grads2[name], g.double()) <= TOLERANCE, name


def _reference_with_masks(block, x, m_att, m1, m2):
    """The block written out in float64 with given dropout masks (already scaled by 1 / (1 - p)):
    attention probabilities times m_att [B, H, T, T], the two residual branches times m1, m2."""
    attn, ffn = block.attn, block.ffn
    b, t, c = x.shape
    h, hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = F.linear(block.norm_attn(x), attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q = q.view(b, t, h, d).transpose(1, 2)
    k = k.view(b, t, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    v = v.view(b, t, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1) * m_att
    att = (probs @ v).transpose(1, 2).reshape(b, t, h * d)
    x1 = x + F.linear(att, attn.out.weight, attn.out.bias) * m1
    hidden = F.gelu(
        F.linear(block.norm_ffn(x1), ffn.fc_in.weight, ffn.fc_in.bias), approximate="tanh"
    )
    return x1 + F.linear(hidden, ffn.fc_out.weight, ffn.fc_out.bias) * m2


def _masks(seed: int, p: float, b: int, h: int, t: int, c: int):
    """The masks the kernels draw from ``seed``, made visible by dropping a tensor of ones."""
    seed_p, seed_attn, seed_mlp = fused._seeds(seed)
    ones = torch.ones(b * h * t, t)
    m_att = fused._add_dropped(None, ones, p, seed_p).view(b, h, t, t)
    m1 = fused._add_dropped(None, torch.ones(b * t, c), p, seed_attn).view(b, t, c)
    m2 = fused._add_dropped(None, torch.ones(b * t, c), p, seed_mlp).view(b, t, c)
    return m_att, m1, m2


@pytest.mark.parametrize(
    "threaded", [True, False], ids=["sequences-per-thread", "pytorch-products"]
)
@pytest.mark.parametrize("shape", [(4, 33, 96, 6, 2), (2, 64, 64, 4, 4)])
def test_dropout_in_training_equals_the_written_out_block_with_its_masks(
    shape, threaded, calls, monkeypatch
) -> None:
    """Dropout p = 0.2 on the attention probabilities and on both residual branches (GPT-2's
    attn_pdrop and resid_pdrop): output, dx and every gradient equal the float64 block written
    out with the same masks."""
    monkeypatch.setattr(fused, "_threaded", lambda batch: threaded and native.blas_ready())
    monkeypatch.setattr(fused, "draw_seed", lambda: torch.tensor(123456789))
    b, t, dim, heads, kv_heads = shape
    p = 0.2
    torch.manual_seed(5)
    block = _block(dim, heads, kv_heads, True, dropout=p).train()
    _randomise(block)
    x, grad = torch.randn(b, t, dim), torch.randn(b, t, dim)
    y, dx, grads = _run(block, x, grad)
    assert calls == [1]
    masks = [m.double() for m in _masks(123456789, p, b, heads, t, dim)]
    block64 = block.double()
    x64 = x.double().requires_grad_()
    want = _reference_with_masks(block64, x64, *masks)
    want.backward(grad.double())
    assert _error(y, want.detach()) <= TOLERANCE
    assert _error(dx, x64.grad) <= TOLERANCE
    for name, param in block64.named_parameters():
        assert _error(grads[name], param.grad) <= TOLERANCE, name


def test_dropout_masks_keep_the_stated_share_and_change_with_the_seed() -> None:
    ones = torch.ones(1000, 1000)
    kept = fused._add_dropped(None, ones, 0.2, 42) > 0
    assert abs(kept.float().mean().item() - 0.8) < 0.002  # 1e6 draws: s.e. 4e-4
    assert (
        fused._add_dropped(None, ones, 0.2, 42) == fused._add_dropped(None, ones, 0.2, 42)
    ).all()
    other = fused._add_dropped(None, ones, 0.2, 43) > 0
    assert abs((kept == other).float().mean().item() - 0.68) < 0.003  # independent: .8^2 + .2^2
    assert set(fused._add_dropped(None, ones, 0.2, 42).unique().tolist()) == {0.0, 1.25}


@pytest.mark.parametrize(
    "threaded", [True, False], ids=["sequences-per-thread", "pytorch-products"]
)
def test_exact_gelu_block_equals_module_path_in_float64(threaded, calls, monkeypatch) -> None:
    """nanoGPT's own block: erf GELU (``activation="gelu"``), no biases."""
    monkeypatch.setattr(fused, "_threaded", lambda batch: threaded and native.blas_ready())
    torch.manual_seed(6)
    block = _block(64, 4, 4, False, act="gelu")
    _randomise(block)
    x, grad = torch.randn(4, 30, 64) * 2, torch.randn(4, 30, 64)
    y, dx, grads = _run(block, x, grad)
    assert calls == [1]
    y64, dx64, grads64 = _run(block.double(), x.double(), grad.double())
    assert _error(y, y64) <= TOLERANCE and _error(dx, dx64) <= TOLERANCE
    for name, g in grads.items():
        assert _error(g, grads64[name]) <= TOLERANCE, name


def test_second_derivatives_with_dropout_equal_the_written_out_block_with_its_masks(
    monkeypatch,
) -> None:
    """create_graph=True in training with dropout p = 0.2: the backward recomputes the block in
    PyTorch's operators with the kernels' own masks, so a gradient penalty |dL/dx|^2 and its
    gradients equal the float64 block written out with those masks."""
    monkeypatch.setattr(fused, "draw_seed", lambda: torch.tensor(24681357))
    b, t, dim, heads, kv_heads, p = 2, 17, 64, 4, 2, 0.2
    torch.manual_seed(8)
    block = _block(dim, heads, kv_heads, True, dropout=p).train()
    _randomise(block)
    x, w = torch.randn(b, t, dim), torch.randn(b, t, dim)

    def penalty(fn, x):  # type: ignore[no-untyped-def]
        x = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad((fn(x) * w.to(x.dtype)).sum(), x, create_graph=True)
        value = dx.square().sum()
        value.backward()
        return value.item(), x.grad

    got, got_dx = penalty(block, x)
    grads = {n: q.grad for n, q in block.named_parameters()}
    block64 = block.double()
    block64.zero_grad(set_to_none=True)
    masks = [m.double() for m in _masks(24681357, p, b, heads, t, dim)]
    want, want_dx = penalty(lambda v: _reference_with_masks(block64, v, *masks), x.double())
    assert abs(got - want) <= TOLERANCE * want
    assert _error(got_dx, want_dx) <= TOLERANCE
    for name, param in block64.named_parameters():
        if param.grad is None:  # dL/dx does not depend on it (the residual branches' last bias)
            assert grads[name] is None, name
        else:
            assert _error(grads[name], param.grad) <= TOLERANCE, name
