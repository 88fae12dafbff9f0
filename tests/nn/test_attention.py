"""Attention: masks, SDPA dispatch vs the written-out equation, grouped-query attention against a
full multi-head oracle, incremental decoding with the KV cache, and the q/k transform hook."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lmarch.nn import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    reference_attention,
    scaled_dot_product_attention,
)

IMPLEMENTATIONS = ["sdpa", "reference"]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def qkv(b: int = 2, h: int = 3, tq: int = 6, tk: int = 6, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, tq, d, generator=g),
        torch.randn(b, h, tk, d, generator=g),
        torch.randn(b, h, tk, d, generator=g),
    )


def test_causal_mask_is_bottom_right_aligned_for_3_queries_over_5_keys() -> None:
    expected = torch.tensor(
        [
            [True, True, True, False, False],
            [True, True, True, True, False],
            [True, True, True, True, True],
        ]
    )
    assert torch.equal(causal_mask(3, 5), expected)
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_padding_mask_shape_and_values() -> None:
    m = padding_mask(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert m.shape == (2, 1, 1, 3) and m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[True, True, False], [False, True, True]]


DISPATCH_CASES = ["causal", "padding", "padding_and_causal_mask", "padding_with_causal_flag"]


@pytest.mark.parametrize("case", DISPATCH_CASES)
def test_sdpa_dispatch_equals_reference(case: str) -> None:
    """The fused kernel and the written-out softmax(QK^T/sqrt(d) + M)V agree (<= 1e-5) for the
    causal flag, a right-padding mask, a padding mask combined with the causal triangle by the
    caller, and a padding mask passed together with ``is_causal=True`` (both must apply)."""
    q, k, v = qkv()
    pad = padding_mask(torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))
    kw = {
        "causal": dict(is_causal=True),
        "padding": dict(mask=pad),
        "padding_and_causal_mask": dict(mask=pad & causal_mask(6, 6)),
        "padding_with_causal_flag": dict(mask=pad, is_causal=True),
    }[case]
    fused = scaled_dot_product_attention(q, k, v, implementation="sdpa", **kw)
    ref = scaled_dot_product_attention(q, k, v, implementation="reference", **kw)
    assert max_err(fused, ref) <= 1e-5


def test_sdpa_dispatch_causal_flag_with_more_keys_than_queries_is_bottom_right() -> None:
    """With 3 queries over 5 keys (a chunk after a cached prefix) ``is_causal`` means the
    bottom-right triangle of :func:`causal_mask` in both implementations, not SDPA's top-left."""
    q, k, v = qkv(tq=3, tk=5)
    explicit = reference_attention(q, k, v, causal_mask(3, 5))
    for implementation in IMPLEMENTATIONS:
        out = scaled_dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        assert max_err(out, explicit) <= 1e-5, implementation


def test_reference_attention_is_the_equation_written_by_hand() -> None:
    q, k, v = qkv(seed=4)
    mask = padding_mask(torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0]])) & causal_mask(6, 6)
    scores = (q @ k.transpose(-2, -1)) / 8**0.5
    by_hand = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    assert max_err(reference_attention(q, k, v, mask), by_hand) <= 1e-6


def test_sdpa_dispatch_rejects_unknown_implementation() -> None:
    q, k, v = qkv(tq=2, tk=2)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        scaled_dot_product_attention(q, k, v, implementation="flashy")


def test_query_that_sees_no_key_gives_zeros_in_both_implementations() -> None:
    """A left-pad query under the causal mask may attend to nothing. PyTorch's SDPA returns zeros
    for such a row; the reference must agree instead of returning NaN."""
    q, k, v = qkv(b=1, tq=4, tk=4)
    mask = padding_mask(torch.tensor([[0, 1, 1, 1]])) & causal_mask(4, 4)  # row 0 sees nothing
    fused = scaled_dot_product_attention(q, k, v, mask=mask, implementation="sdpa")
    ref = scaled_dot_product_attention(q, k, v, mask=mask, implementation="reference")
    assert torch.equal(fused[..., 0, :], torch.zeros_like(fused[..., 0, :]))
    assert torch.isfinite(ref).all()
    assert max_err(fused, ref) <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_left_padding_does_not_change_real_tokens_through_two_layers(implementation: str) -> None:
    """Two stacked causal attention layers over a left-padded sequence give, at the real tokens,
    the outputs of the unpadded sequence (<= 1e-5): pad positions must not leak NaN or values."""
    torch.manual_seed(0)
    layers = [MultiHeadAttention(16, 4, implementation=implementation).eval() for _ in range(2)]
    x = torch.randn(1, 5, 16)
    padded = torch.cat([torch.randn(1, 3, 16), x], dim=1)
    mask = padding_mask(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    y, y_pad = x, padded
    with torch.no_grad():
        for layer in layers:
            y = layer(y)
            y_pad = layer(y_pad, attention_mask=mask)
    assert torch.isfinite(y_pad[:, 3:]).all()
    assert max_err(y_pad[:, 3:], y) <= 1e-5


def full_heads_oracle(gqa: MultiHeadAttention) -> MultiHeadAttention:
    """A plain multi-head module (n_kv_heads == n_heads) in which every query head owns a copy of
    its group's key/value projection: query head h uses KV head h // (n_heads / n_kv_heads)."""
    h, h_kv, d = gqa.n_heads, gqa.n_kv_heads, gqa.head_dim
    rep = h // h_kv
    dim = gqa.qkv.in_features
    full = MultiHeadAttention(dim, h, n_kv_heads=h, head_dim=d, bias=True).eval()
    w, b = gqa.qkv.weight.detach(), gqa.qkv.bias.detach()
    wq, wk, wv = w.split([h * d, h_kv * d, h_kv * d])
    bq, bk, bv = b.split([h * d, h_kv * d, h_kv * d])

    def widen(m: Tensor) -> Tensor:  # [h_kv*d, ...] -> [h*d, ...], each head's rows repeated
        return m.reshape(h_kv, d, *m.shape[1:]).repeat_interleave(rep, dim=0).reshape(h * d, -1)

    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([wq, widen(wk), widen(wv)]))
        full.qkv.bias.copy_(torch.cat([bq, widen(bk[:, None])[:, 0], widen(bv[:, None])[:, 0]]))
        full.out.load_state_dict(gqa.out.state_dict())
    return full


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights(
    n_kv_heads: int,
) -> None:
    """GQA (8 query heads over 2 KV heads) and MQA (1 KV head) equal a full 8-head attention whose
    K/V projections are the shared heads copied into each group (<= 1e-5), causal and masked."""
    torch.manual_seed(1)
    gqa = MultiHeadAttention(32, 8, n_kv_heads=n_kv_heads).eval()
    with torch.no_grad():
        gqa.qkv.bias.normal_()  # non-zero biases so their placement is checked too
    full = full_heads_oracle(gqa)
    assert full.qkv.weight.shape == (3 * 32, 32)
    x = torch.randn(2, 7, 32)
    mask = padding_mask(torch.tensor([[1] * 7, [1] * 5 + [0] * 2]))
    with torch.no_grad():
        assert max_err(gqa(x), full(x)) <= 1e-5
        assert max_err(gqa(x, attention_mask=mask), full(x, attention_mask=mask)) <= 1e-5


def test_n_heads_must_be_a_multiple_of_n_kv_heads() -> None:
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MultiHeadAttention(24, 6, n_kv_heads=4)


def rotary(q: Tensor, k: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """A minimal rotate-half RoPE, so the cached keys depend on the position passed to the hook."""

    def rot(x: Tensor) -> Tensor:
        t, d = x.shape[-2], x.shape[-1]
        inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        ang = torch.arange(start, start + t, dtype=torch.float32)[:, None] * inv
        cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return rot(q), rot(k)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("use_rotary", [False, True])
def test_kv_cache_decoding_equals_full_causal_forward(
    implementation: str, use_rotary: bool
) -> None:
    """Prefill 5 tokens then 4 single-token steps, and prefill 5 then one 3-token chunk, give the
    full causal forward's outputs at every position (<= 1e-5), with GQA and a positional hook."""
    torch.manual_seed(2)
    attn = MultiHeadAttention(24, 6, n_kv_heads=2, implementation=implementation).eval()
    hook = rotary if use_rotary else None
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        full = attn(x, qk_transform=hook)

        cache = KVCache(1, 2, 2, 16, attn.head_dim)
        steps = [attn(x[:, :5], cache=cache, start=0, qk_transform=hook)]
        for pos in range(5, 9):
            steps.append(attn(x[:, pos : pos + 1], cache=cache, start=pos, qk_transform=hook))
        assert max_err(torch.cat(steps, dim=1), full) <= 1e-5

        cache = KVCache(1, 2, 2, 16, attn.head_dim)
        prefill = attn(x[:, :5], cache=cache, start=0, qk_transform=hook)
        chunk = attn(x[:, 5:8], cache=cache, start=5, qk_transform=hook)
        assert max_err(prefill, full[:, :5]) <= 1e-5
        assert max_err(chunk, full[:, 5:8]) <= 1e-5


def test_kv_cache_raises_on_overflow_and_leaves_contents_unchanged() -> None:
    attn = MultiHeadAttention(8, 2).eval()
    cache = KVCache(1, 1, 2, 6, 4)
    x = torch.randn(1, 7, 8)
    with torch.no_grad():
        attn(x[:, :5], cache=cache, start=0)
        keys, values = cache.keys.clone(), cache.values.clone()
        with pytest.raises(ValueError, match="holds 6 positions; asked to write up to 7"):
            attn(x[:, 5:7], cache=cache, start=5)
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)


def test_kv_cache_update_returns_everything_written_so_far() -> None:
    cache = KVCache(2, 1, 1, 8, 2)
    a, b = torch.arange(6.0).view(1, 1, 3, 2), torch.arange(6.0, 10.0).view(1, 1, 2, 2)
    cache.update(1, a, -a, 0)
    k, v = cache.update(1, b, -b, 3)
    assert torch.equal(k, torch.cat([a, b], dim=2)) and torch.equal(v, -k)
    assert torch.equal(cache.keys[0], torch.zeros(1, 1, 8, 2))  # other layer untouched


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_qk_transform_zeroing_queries_gives_mean_of_visible_values(implementation: str) -> None:
    """With q scaled by 0 every score is equal, so causal attention at position t is the mean of
    values 0..t; the hook also receives each chunk's start position."""
    torch.manual_seed(3)
    attn = MultiHeadAttention(8, 2, implementation=implementation).eval()
    starts: list[int] = []

    def zero_q(q: Tensor, k: Tensor, start: int) -> tuple[Tensor, Tensor]:
        starts.append(start)
        return q * 0, k

    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y = attn(x, qk_transform=zero_q)
        v = x @ attn.qkv.weight[16:].T + attn.qkv.bias[16:]  # [B, T, 8]: both heads' values
        mean_v = v.cumsum(dim=1) / torch.arange(1, 6).view(1, 5, 1)
        expected = attn.out(mean_v)
        assert max_err(y, expected) <= 1e-6

        cache = KVCache(1, 2, 2, 8, 4)
        attn(x[:, :3], cache=cache, start=0, qk_transform=zero_q)
        attn(x[:, 3:4], cache=cache, start=3, qk_transform=zero_q)
    assert starts == [0, 0, 3]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_softmax_scale_multiplies_the_scores_in_every_path(implementation: str) -> None:
    """A non-default ``softmax_scale`` (GPT-2's scale_attn_weights=False is 1.0) gives the written-out
    equation with that scale, in a full causal call (head width 16, which a native kernel could take)
    and in cached one-token decoding (<= 1e-5)."""
    torch.manual_seed(5)
    attn = MultiHeadAttention(
        64, 4, n_kv_heads=2, implementation=implementation, softmax_scale=0.3
    ).eval()
    x = torch.randn(2, 7, 64)
    q, k, v = attn.qkv(x).split([64, 32, 32], dim=-1)
    q = q.view(2, 7, 4, 16).transpose(1, 2)
    k = k.view(2, 7, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = v.view(2, 7, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~causal_mask(7, 7), float("-inf"))
    expected = attn.out((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 7, 64))
    with torch.no_grad():
        assert max_err(attn(x), expected) <= 1e-5
        cache = KVCache(1, 2, 2, 8, 16)
        steps = [attn(x[:, :4], cache=cache, start=0)]
        steps += [attn(x[:, p : p + 1], cache=cache, start=p) for p in range(4, 7)]
        assert max_err(torch.cat(steps, dim=1), expected) <= 1e-5
    default = MultiHeadAttention(64, 4, n_kv_heads=2, implementation=implementation)
    assert default.softmax_scale is None
