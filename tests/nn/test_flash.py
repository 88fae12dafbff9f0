"""Flash attention written out (lmarch.nn.flash) against the equation written out.

Oracle: reference_attention (softmax(q k^T · scale, masked) v) evaluated in float64, with
repeated key/value heads for grouped-query attention. Outputs and the gradients of q, k, v agree
to 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from lmarch.nn.attention import causal_mask, reference_attention, repeat_kv
from lmarch.nn.flash import flash_attention

TOL = 1e-5


def _oracle(q, k, v, causal=False, pad=None, scale=None):
    """float64 softmax(q k^T scale, masked) v, the mask built as the rest of lmarch builds it."""
    t, s = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = causal_mask(t, s)
    if pad is not None:
        pm = pad[:, None, None, :]
        mask = pm if mask is None else mask & pm
    n_rep = q.shape[1] // k.shape[1]
    return reference_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, scale=scale)


def _compare(b, h, h_kv, t, s, d, causal=False, pad=None, scale=None, block_q=16, block_k=16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, d, generator=gen)
    k = torch.randn(b, h_kv, s, d, generator=gen)
    v = torch.randn(b, h_kv, s, d, generator=gen)
    grad = torch.randn(b, h, t, d, generator=gen)

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = flash_attention(
        *leaves,
        causal=causal,
        key_padding_mask=pad,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
    )
    out.backward(grad)

    ref_leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = _oracle(*ref_leaves, causal=causal, pad=pad, scale=scale)
    ref.backward(grad.double())

    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), atol=TOL, rtol=TOL)
    for got, want, name in zip(leaves, ref_leaves, "qkv", strict=True):
        torch.testing.assert_close(
            got.grad.double(), want.grad, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"d{n}: {m}"
        )
    return out, leaves


def test_non_causal_matches_the_equation() -> None:
    _compare(2, 3, 3, 40, 40, 16)


def test_causal_square_matches_the_equation() -> None:
    _compare(2, 2, 2, 48, 48, 8, causal=True)


def test_causal_with_cached_keys_is_bottom_right_aligned() -> None:
    # 20 new queries after 30 cached keys: query i sees keys 0 .. 30 + i
    _compare(1, 2, 2, 20, 50, 8, causal=True)


def test_padding_mask_and_a_row_that_sees_nothing_gives_zeros() -> None:
    # batch 0: keys 0..3 padded; with causal, query 0..3 (keys 0..3 only) sees nothing
    pad = torch.ones(2, 24, dtype=torch.bool)
    pad[0, :4] = False
    pad[1, 20:] = False
    out, leaves = _compare(2, 2, 2, 24, 24, 8, causal=True, pad=pad)
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert torch.equal(leaves[0].grad[0, :, :4], torch.zeros_like(leaves[0].grad[0, :, :4]))


def test_padding_mask_without_causal() -> None:
    pad = torch.ones(2, 33, dtype=torch.bool)
    pad[1, :10] = False
    _compare(2, 2, 2, 33, 33, 8, pad=pad)


def test_grouped_query_heads_four_over_two() -> None:
    _compare(2, 4, 2, 37, 37, 16, causal=True)


def test_non_default_scale() -> None:
    _compare(1, 2, 2, 30, 30, 8, scale=0.3)


def test_length_not_a_multiple_of_the_block() -> None:
    # 50 queries and keys in blocks of 16 x 12: last blocks are partial
    _compare(1, 2, 1, 50, 50, 8, causal=True, block_q=16, block_k=12)


def test_default_blocks_on_a_short_sequence() -> None:
    _compare(1, 2, 2, 70, 70, 8, causal=True, block_q=128, block_k=128)


def test_bad_shapes_are_refused_by_their_message() -> None:
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


def _largest_saved(fn) -> tuple[int, int]:
    """(numel of the largest tensor saved for backward, how many were saved) while ``fn`` runs."""
    sizes: list[int] = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return max(sizes), len(sizes)


def test_nothing_quadratic_is_saved_for_backward() -> None:
    t, d = 1024, 64
    q, k, v = (torch.randn(1, 1, t, d, requires_grad=True) for _ in range(3))
    largest, count = _largest_saved(
        lambda: flash_attention(q, k, v, causal=True, block_q=128, block_k=128)
    )
    assert count >= 5  # q, k, v, out, log-sum-exp
    assert largest <= t * d  # O(T·D); a score matrix would be T*T = 16x more
    # the written-out equation does save T x T probabilities: the check can tell them apart
    ref_largest, _ = _largest_saved(lambda: reference_attention(q, k, v, causal_mask(t, t)))
    assert ref_largest >= t * t


def test_more_queries_than_keys_causal_leaves_early_rows_empty() -> None:
    # bottom-right aligned with T > S: the first T - S queries see no key and give zeros
    out, _ = _compare(1, 2, 2, 30, 10, 8, causal=True, block_q=8, block_k=4)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))


def test_grouped_query_heads_with_padding_and_cached_keys() -> None:
    pad = torch.ones(2, 41, dtype=torch.bool)
    pad[0, :7] = False
    _compare(2, 6, 2, 19, 41, 16, causal=True, pad=pad, scale=0.2, block_q=8, block_k=16)


def _family_models(attention: str) -> dict[str, torch.nn.Module]:
    from lmarch.models import GPT, GPTConfig, Llama, LlamaConfig
    from lmarch.models.bert import BertConfig, BertModel

    torch.manual_seed(0)
    return {
        "gpt": GPT(GPTConfig(vocab_size=50, block_size=40, n_layer=2, n_head=2, n_embd=32,
                             attention=attention)),
        "llama": Llama(LlamaConfig(vocab_size=50, block_size=40, n_layer=2, n_head=4, n_kv_head=2,
                                   n_embd=32, intermediate_size=48, attention=attention)),
        "bert": BertModel(BertConfig(vocab_size=50, block_size=40, n_layer=2, n_head=4, n_embd=32,
                                     intermediate_size=64, dropout=0.0, attention=attention)),
    }  # fmt: skip


@pytest.mark.parametrize("family", ["gpt", "llama", "bert"])
def test_every_family_runs_on_it_with_the_reference_outputs_and_gradients(family) -> None:
    """``attention="flash"`` in a model config: logits (BERT: states, with padding) and every
    parameter's gradient equal those of ``attention="reference"`` to 1e-5."""
    flash, ref = _family_models("flash")[family], _family_models("reference")[family]
    ids = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if family == "bert":
        mask = torch.ones_like(ids)
        mask[1, 20:] = 0
        kwargs = {"attention_mask": mask}
    outs = []
    for model in (flash, ref):
        out = model(ids, **kwargs)
        (out.float().square().mean()).backward()
        outs.append(out.detach())
    assert (outs[0] - outs[1]).abs().max().item() <= TOL
    grads = dict(ref.named_parameters())
    for name, p in flash.named_parameters():
        if p.grad is None:  # BERT's pooler: not on the path to the states
            assert grads[name].grad is None, name
            continue
        assert (p.grad - grads[name].grad).abs().max().item() <= TOL, name


def test_flash_in_a_config_refuses_attention_dropout() -> None:
    from lmarch.models import GPTConfig
    from lmarch.models.validate import ConfigError

    with pytest.raises(ConfigError, match="attention='flash' has no attention dropout"):
        GPTConfig(attention="flash", dropout=0.1)
