"""Encoder-decoder building blocks against their equations written out in float64: attention with
an additive bias, cross-attention with the encoder's padding mask, the decoder block (pre- and
post-norm), the encoder-decoder cache (cross keys/values computed once, reordering by batch row)
and T5's relative position buckets (against transformers' own function)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lmarch.nn import (
    CrossAttention,
    CrossAttentionBlock,
    EncoderDecoderCache,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    RelativePositionBias,
    relative_position_bucket,
    scaled_dot_product_attention,
)
from lmarch.nn.ffn import MLP

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def equation(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, allowed: Tensor | None
) -> Tensor:
    """softmax(q k^T * scale + bias, -inf where not allowed) v, in float64; rows with no
    allowed key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.double()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return w @ v


def heads(x: Tensor, n: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)


def merge(y: Tensor) -> Tensor:
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize("implementation", ["sdpa", "reference", "flash"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_bias_and_padding_equals_the_equation(
    implementation: str, causal: bool
) -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=g, requires_grad=True)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()[:, None, None, :]
    allowed = keep & torch.ones(5, 5).tril().bool() if causal else keep
    y = scaled_dot_product_attention(
        q, k, v, mask=keep, is_causal=causal, implementation=implementation, scale=1.0, bias=bias
    )
    expected = equation(q, k, v, 1.0, bias, allowed)
    assert (y.double() - expected).abs().max().item() < TOL
    # the bias is learned (T5's table): its gradient must be the equation's too
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((y * weights).sum(), bias)
    b64 = bias.detach().double().requires_grad_()
    (want,) = torch.autograd.grad((equation(q, k, v, 1.0, b64, allowed) * weights).sum(), b64)
    assert (grad.double() - want).abs().max().item() < 1e-4


@torch.no_grad()  # decoding with a cache is inference
def test_self_attention_with_position_bias_equals_the_equation_and_decodes_with_a_cache() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, bias=False, causal=True, softmax_scale=1.0).eval()
    x = torch.randn(2, 6, 16)
    bias = torch.randn(1, 4, 6, 6)
    wq, wk, wv = mha.qkv.weight.split(16)
    q, k, v = heads(x @ wq.T, 4), heads(x @ wk.T, 4), heads(x @ wv.T, 4)
    expected = merge(equation(q, k, v, 1.0, bias, torch.ones(6, 6).tril().bool()).float())
    expected = expected @ mha.out.weight.T
    y = mha(x, position_bias=bias)
    assert (y - expected).abs().max().item() < TOL
    # token by token through the cache, each step with its row of the bias
    cache = KVCache(1, 2, 4, 6, 4)
    steps = [
        mha(x[:, t : t + 1], cache=cache, start=t, position_bias=bias[:, :, t : t + 1, : t + 1])
        for t in range(6)
    ]
    assert (torch.cat(steps, 1) - expected).abs().max().item() < TOL


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cross_attention_equals_the_equation_with_encoder_padding(n_kv_heads: int) -> None:
    torch.manual_seed(0)
    ca = CrossAttention(16, 4, memory_dim=12, n_kv_heads=n_kv_heads, bias=True).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 12)
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    q = heads(ca.q(x), 4)
    kv = ca.kv(memory)
    k, v = (
        heads(kv[..., : n_kv_heads * 4], n_kv_heads),
        heads(kv[..., n_kv_heads * 4 :], n_kv_heads),
    )
    rep = 4 // n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    allowed = real.bool()[:, None, None, :]
    expected = ca.out(merge(equation(q, k, v, 1 / math.sqrt(4), None, allowed).float()))
    assert (ca(x, memory, memory_mask=real) - expected).abs().max().item() < TOL
    # padded encoder positions change nothing: cut them off instead of masking
    short = ca(x[1:], memory[1:, :4])
    assert (short - expected[1:]).abs().max().item() < TOL


@torch.no_grad()  # decoding with a cache is inference
def test_cross_attention_keys_and_values_are_computed_once_per_sequence() -> None:
    torch.manual_seed(0)
    ca = CrossAttention(16, 4, bias=False, softmax_scale=1.0).eval()
    memory, real = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    calls = []
    ca.kv.register_forward_hook(lambda *_: calls.append(1))
    cache = EncoderDecoderCache(KVCache(1, 2, 4, 8, 4), n_layers=1, memory_mask=real)
    x = torch.randn(2, 4, 16)
    steps = [ca(x[:, t : t + 1], memory if t == 0 else None, cache=cache) for t in range(4)]
    assert len(calls) == 1
    full = ca(x, memory, memory_mask=real)
    assert len(calls) == 2
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL
    with pytest.raises(ValueError, match="needs the encoder output"):
        ca(x, None)


def make_block(pre_norm: bool) -> CrossAttentionBlock:
    return CrossAttentionBlock(
        self_attn=MultiHeadAttention(16, 4, causal=True),
        cross_attn=CrossAttention(16, 4),
        ffn=MLP(16, 32, "relu"),
        norm_self=LayerNorm(16),
        norm_cross=LayerNorm(16),
        norm_ffn=LayerNorm(16),
        pre_norm=pre_norm,
    ).eval()


def block_equation(blk: CrossAttentionBlock, x: Tensor, memory: Tensor, real: Tensor) -> Tensor:
    """The block written out from its parts (each sub-layer by the equations tested above)."""

    def self_attn(h: Tensor) -> Tensor:
        wq, wk, wv = blk.self_attn.qkv.weight.split(16)
        bq, bk, bv = blk.self_attn.qkv.bias.split(16)
        q, k, v = (heads(h @ w.T + b, 4) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        t = h.shape[1]
        y = equation(q, k, v, 0.5, None, torch.ones(t, t).tril().bool()).float()
        return blk.self_attn.out(merge(y))

    def cross_attn(h: Tensor) -> Tensor:
        kv = blk.cross_attn.kv(memory)
        q, k, v = heads(blk.cross_attn.q(h), 4), heads(kv[..., :16], 4), heads(kv[..., 16:], 4)
        y = equation(q, k, v, 0.5, None, real.bool()[:, None, None, :]).float()
        return blk.cross_attn.out(merge(y))

    n1, n2, n3, ffn = blk.norm_self, blk.norm_cross, blk.norm_ffn, blk.ffn
    if blk.pre_norm:
        x = x + self_attn(n1(x))
        x = x + cross_attn(n2(x))
        return x + ffn(n3(x))
    x = n1(x + self_attn(x))
    x = n2(x + cross_attn(x))
    return n3(x + ffn(x))


@pytest.mark.parametrize("pre_norm", [True, False])
@torch.no_grad()
def test_decoder_block_equals_its_equation_and_decodes_step_by_step(pre_norm: bool) -> None:
    torch.manual_seed(0)
    blk = make_block(pre_norm)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    expected = block_equation(blk, x, memory, real)
    assert (blk(x, memory, memory_mask=real) - expected).abs().max().item() < TOL
    cache = EncoderDecoderCache(KVCache(1, 2, 4, 5, 4), n_layers=1, memory_mask=real)
    steps = [blk(x[:, t : t + 1], memory, cache=cache, start=t) for t in range(5)]
    assert (torch.cat(steps, 1) - expected).abs().max().item() < TOL


@torch.no_grad()  # decoding with a cache is inference
def test_reordered_cache_decodes_as_the_reordered_batch() -> None:
    torch.manual_seed(0)
    blk = make_block(True)
    x, memory = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    cache = EncoderDecoderCache(KVCache(1, 3, 4, 4, 4), n_layers=1, memory_mask=real)
    for t in range(2):
        blk(x[:, t : t + 1], memory, cache=cache, start=t)
    order = torch.tensor([2, 0, 0])  # beams: row 0 continues old row 2, rows 1 and 2 old row 0
    cache.reorder(order)
    assert torch.equal(cache.memory_mask, real[order])
    new = torch.randn(3, 1, 16)
    step = blk(new, None, cache=cache, start=2)
    # the same step from scratch: the reordered prefixes then the new tokens
    prefix = torch.cat([x[order, :2], new], dim=1)
    full = blk(prefix, memory[order], memory_mask=real[order])
    assert (step[:, 0] - full[:, 2]).abs().max().item() < TOL


def test_relative_buckets_equal_transformers_t5() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ours = relative_position_bucket(offsets, bidirectional, buckets, distance)
            theirs = T5Attention._relative_position_bucket(
                offsets, bidirectional, buckets, distance
            )
            assert torch.equal(ours, theirs)
    # by hand (32 buckets, 128 apart): exact below 8 per direction, the sign in the upper half,
    # then log-spaced buckets capped at 15 / 31
    small = relative_position_bucket(torch.tensor([0, 1, 7, -1, -7, 8, 127, 1000, -1000]))
    assert small.tolist() == [0, 17, 23, 1, 7, 24, 31, 31, 15]
    causal = relative_position_bucket(torch.tensor([1, 0, -1, -15, -16, -2000]), False)
    assert causal.tolist() == [0, 0, 1, 15, 16, 31]


def test_relative_position_bias_of_a_decoding_step_is_its_row_of_the_full_table() -> None:
    torch.manual_seed(0)
    rel = RelativePositionBias(4, 32, 128, bidirectional=False)
    full = rel(6, 6)
    assert full.shape == (1, 4, 6, 6)
    assert torch.equal(rel(1, 4, offset=3), full[:, :, 3:4, :4])
    # the table's entry for each (query, key) is the embedding row of its bucket
    bucket = relative_position_bucket(torch.tensor(1 - 4), False)
    assert torch.equal(full[0, :, 4, 1], rel.embedding.weight[bucket])


def test_cross_attention_refuses_a_three_dim_mask() -> None:
    ca = CrossAttention(8, 2)
    with pytest.raises(ValueError, match=r"memory_mask must be \[B, S\]"):
        ca(torch.randn(1, 2, 8), torch.randn(1, 3, 8), memory_mask=torch.ones(1, 1, 3))
