"""The written-out RNN / LSTM / GRU against torch.nn.RNN / LSTM / GRU holding the same weights:
outputs, final states and the gradients of the input, the initial state and every parameter
agree to 1e-5 (float32); state dicts load either way; the fused kernel swapped in from
lmarch.native.fused_recurrent agrees with the reference too."""

from __future__ import annotations

import copy

import pytest
import torch

from lmarch.native.fused_recurrent import FusedRecurrent, swap_fused_recurrent
from lmarch.nn.recurrent import GRU, LSTM, RNN, Recurrent, RecurrentState

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5

# (lmarch class, torch class, extra arguments)
KINDS = {
    "rnn_tanh": (RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (LSTM, torch.nn.LSTM, {}),
    "gru": (GRU, torch.nn.GRU, {}),
}


def pair(kind: str, **kwargs) -> tuple[Recurrent, torch.nn.Module]:
    """A torch stack with random weights and an lmarch stack loaded from its state dict."""
    ours_cls, torch_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    reference = torch_cls(5, 7, **extra, **kwargs)
    ours = ours_cls(5, 7, **extra, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def states(state) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def run(module, x, hx):
    """Forward + backward of a fixed function of outputs and final states; returns the
    outputs, final states and gradients (input, initial states, then parameters by name)."""
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    out, final = module(x, hx if len(hx) == 2 else hx[0])
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
    loss = loss + sum((s**2).sum() for s in states(final))
    module.zero_grad()
    loss.backward()
    grads = [x.grad, *(h.grad for h in hx)]
    grads += [p.grad for _, p in sorted(module.named_parameters())]
    return out, states(final), grads


def assert_close(a, b) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_parity_with_torch(kind: str, batch_first: bool, bidirectional: bool) -> None:
    """Two layers, given initial states: outputs, final states and all gradients within 1e-5."""
    ours, reference = pair(kind, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    batch, steps, d = 3, 6, 2 if bidirectional else 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((batch, steps, 5) if batch_first else (steps, batch, 5), generator=gen)
    n_states = 2 if kind == "lstm" else 1
    hx = tuple(torch.randn(2 * d, batch, 7, generator=gen) for _ in range(n_states))
    out_a, final_a, grads_a = run(ours, x, hx)
    out_b, final_b, grads_b = run(reference, x, hx)
    assert out_a.shape == out_b.shape == (*x.shape[:2], 7 * d)
    assert_close(out_a, out_b)
    for a, b in zip(final_a, final_b, strict=True):
        assert_close(a, b)
    assert len(grads_a) == len(grads_b) == 1 + n_states + 4 * 2 * d
    for a, b in zip(grads_a, grads_b, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_initial_state_and_unbatched_input(kind: str) -> None:
    """Without hx the state starts at zero; a 2-D input is one unbatched sequence."""
    ours, reference = pair(kind, num_layers=3)
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(2))
    (out_a, final_a), (out_b, final_b) = ours(x), reference(x)
    assert out_a.shape == (9, 7)
    assert_close(out_a, out_b)
    for a, b in zip(states(final_a), states(final_b), strict=True):
        assert a.shape == (3, 7)
        assert_close(a, b)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_moves_both_ways(kind: str) -> None:
    """Same names and shapes as torch; lmarch's weights load into torch and give its outputs."""
    ours_cls, torch_cls, extra = KINDS[kind]
    torch.manual_seed(3)
    ours = ours_cls(4, 6, 2, bidirectional=True, **extra)
    reference = torch_cls(4, 6, 2, bidirectional=True, **extra)
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    reference.load_state_dict(mine)
    x = torch.randn(5, 2, 4)
    assert_close(ours(x)[0], reference(x)[0])


def test_no_bias_matches_torch() -> None:
    """bias=False: no bias parameters, same function as torch's."""
    ours, reference = pair("lstm", num_layers=2, bias=False)
    assert not any("bias" in name for name, _ in ours.named_parameters())
    x = torch.randn(4, 2, 5)
    assert_close(ours(x)[0], reference(x)[0])


def test_dropout_acts_between_layers_only() -> None:
    """A 1-layer stack has nowhere to put its dropout (training == eval); a 2-layer stack in
    training drops some of the first layer's outputs, so its outputs change; eval is exact."""
    x = torch.randn(6, 2, 5)
    one = LSTM(5, 7, 1, dropout=0.5)
    torch.manual_seed(0)
    assert torch.equal(one.train()(x)[0], one.eval()(x)[0])
    two, reference = pair("lstm", num_layers=2, dropout=0.5)
    torch.manual_seed(0)
    trained = two.train()(x)[0]
    assert (trained - two.eval()(x)[0]).abs().max() > 1e-3
    reference.eval()
    assert_close(two(x)[0], reference(x)[0])


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown recurrent mode 'elman'"):
        Recurrent("elman", 3, 4)
    with pytest.raises(ValueError, match="nonlinearity must be tanh or relu"):
        RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout must lie in"):
        GRU(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="2 or 3 dimensions"):
        GRU(3, 4)(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"initial state of shape \(2, 5, 4\), got \(2, 1, 4\)"):
        GRU(3, 4, 2)(torch.zeros(7, 5, 3), torch.zeros(2, 1, 4))  # would broadcast silently
    with pytest.raises(ValueError, match="state is a pair"):
        LSTM(3, 4)(torch.zeros(7, 5, 3), torch.zeros(1, 5, 4))


def test_recurrent_state_reset_and_reorder() -> None:
    """reset_ zeroes the masked rows only; reorder gathers rows (beam search)."""
    h = torch.arange(24.0).reshape(2, 3, 4)
    state = RecurrentState((h, -h))
    state.reset_(torch.tensor([False, True, False]))
    assert torch.equal(state.state[0][:, 1], torch.zeros(2, 4))
    assert torch.equal(state.state[1][:, 0], -h[:, 0])
    state.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(state.state[0], h[:, [2, 2, 0]])
    assert state.batch_size == 3


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_swap_matches_reference(kind: str, bidirectional: bool) -> None:
    """The fused kernel over the same parameter tensors: outputs, states and gradients within
    1e-5, same state dict (names, and the very tensors), isinstance kept, swap idempotent."""
    ours, _ = pair(kind, num_layers=2, batch_first=True, bidirectional=bidirectional)
    fused = copy.deepcopy(ours)
    before = {k: v.data_ptr() for k, v in fused.state_dict().items()}
    assert swap_fused_recurrent(fused) == 1
    assert swap_fused_recurrent(fused) == 0
    assert isinstance(fused, FusedRecurrent) and isinstance(fused, type(ours))
    assert {k: v.data_ptr() for k, v in fused.state_dict().items()} == before
    d = 2 if bidirectional else 1
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 5, generator=gen)
    hx = tuple(torch.randn(2 * d, 3, 7, generator=gen) for _ in range(2 if kind == "lstm" else 1))
    for a, b in zip(run(ours, x, hx), run(fused, x, hx), strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert_close(ta, tb)
