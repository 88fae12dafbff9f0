"""The recurrent LM family: the state as decoding cache (token by token == all at once), greedy
decoding with and without it, parameter counts and budgets, config refusals, the presets, and
the fused kernel swapped in for training (same loss and gradients, same state dict)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmarch.errors import LmarchError
from lmarch.generation.beam import BeamSearchConfig, beam_search_prompts
from lmarch.generation.generate import generate
from lmarch.models import RecurrentLM, RNNConfig
from lmarch.models import rnn as rnn_module
from lmarch.models.registry import PRESETS, build_model, count_parameters
from lmarch.models.rnn import config_for_budget, rnn_parameter_count
from lmarch.native import accelerate
from lmarch.native.fused_recurrent import FusedRecurrent
from lmarch.train.tbptt import CarriedStateLoss

pytestmark = pytest.mark.usefixtures("one_thread")
CELLS = ("lstm", "gru", "rnn", "rnn_relu")


def tiny(cell: str, **overrides) -> RecurrentLM:
    torch.manual_seed(0)
    fields = dict(cell=cell, vocab_size=11, n_embd=8, hidden_size=12, n_layer=2, dropout=0.0)
    return RecurrentLM(RNNConfig(**{**fields, **overrides})).eval()


@pytest.mark.parametrize("cell", CELLS)
def test_token_by_token_through_the_state_equals_all_at_once(cell: str) -> None:
    """Feeding a sequence in pieces through make_cache's state gives the logits of one call
    over the whole sequence (to 1e-6): the state is the whole past."""
    model = tiny(cell)
    ids = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    whole = model(ids)
    cache = model.make_cache(2)
    pieces = [model(ids[:, :4], cache=cache, start=0)]
    pieces += [model(ids[:, t : t + 1], cache=cache, start=t) for t in range(4, 9)]
    assert (torch.cat(pieces, dim=1) - whole).abs().max() < 1e-6
    last = model(ids, cache=model.make_cache(2), last_only=True)
    assert last.shape == (2, 1, 11)
    assert (last[:, 0] - whole[:, -1]).abs().max() < 1e-6


def test_long_inputs_are_read_in_pieces_exactly(monkeypatch) -> None:
    """Read in pieces of 4 tokens (READ_CHUNK shrunk), a 14-token input gives the logits and
    final state of one pass (to 1e-6), last_only included."""
    model = tiny("lstm")
    ids = torch.randint(11, (2, 14), generator=torch.Generator().manual_seed(3))
    whole_cache = model.make_cache(2)
    whole = model(ids, cache=whole_cache)
    monkeypatch.setattr(rnn_module, "READ_CHUNK", 4)
    cache = model.make_cache(2)
    assert (model(ids, cache=cache) - whole).abs().max() < 1e-6
    for a, b in zip(cache.state, whole_cache.state, strict=True):
        assert (a - b).abs().max() < 1e-6
    last = model(ids, last_only=True)
    assert last.shape == (2, 1, 11) and (last[:, 0] - whole[:, -1]).abs().max() < 1e-6


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_decoding_with_state_equals_recomputing(cell: str) -> None:
    """generate() with the cached state and without (re-reading the whole text every step)
    pick the same 12 tokens."""
    model = tiny(cell)
    prompt = torch.tensor([[1, 2, 3, 4]])
    cached = generate(model, prompt, 12, use_cache=True)
    recomputed = generate(model, prompt, 12, use_cache=False)
    assert cached.shape == (1, 16)
    assert torch.equal(cached, recomputed)


def test_beam_search_reorders_the_state() -> None:
    """Beam search (3 beams) through the state's reorder: each returned beam's score is the
    log-probability of its tokens recomputed in one pass without a cache (to 1e-5)."""
    model = tiny("lstm")
    with torch.no_grad():  # larger weights: peaked, state-dependent choices, so beams swap parents
        for p in model.parameters():
            p.mul_(4)
    prompt = [5, 6]
    config = BeamSearchConfig(
        num_beams=3, max_new_tokens=6, length_penalty=0.0, num_return_sequences=3
    )
    found = beam_search_prompts(model, [prompt], config)[0]
    assert len(found) == 3 and len({tuple(h.token_ids) for h in found}) == 3
    for hyp in found:
        ids = torch.tensor([prompt + list(hyp.token_ids)])
        log_probs = F.log_softmax(model(ids[:, :-1]), -1)[0, len(prompt) - 1 :]
        total = log_probs.gather(1, ids[0, len(prompt) :, None]).sum().item()
        assert abs(total - hyp.score) < 1e-5


def test_tied_weights_share_the_embedding() -> None:
    model = tiny("gru", n_embd=12, tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert count_parameters(model.config) == rnn_parameter_count(model.config)


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.family == "rnn"])
def test_preset_parameter_count_formula(name: str) -> None:
    """rnn_parameter_count (from the shapes) equals the parameters the model holds."""
    config = PRESETS[name].config
    assert rnn_parameter_count(config) == sum(p.numel() for p in build_model(config).parameters())


def test_presets_are_char_level_and_trainable() -> None:
    for cell in ("lstm", "gru", "rnn"):
        preset = PRESETS[f"{cell}-char-small"]
        assert preset.family == "rnn" and preset.tokenizer == "char" and preset.trainable
        assert preset.config.cell == cell and preset.config.n_layer == 2


@pytest.mark.parametrize("tie", [False, True])
def test_budget_gives_the_largest_hidden_size_that_fits(tie: bool) -> None:
    """config_for_budget: within the budget, and one more unit of hidden size is over it."""
    budget = 250_000
    config = config_for_budget(budget, cell="lstm", vocab_size=65, n_layer=2, tie_weights=tie)
    assert config.n_embd == config.hidden_size
    assert rnn_parameter_count(config) <= budget
    bigger = RNNConfig(
        **{**config.__dict__, "hidden_size": config.hidden_size + 1, "n_embd": config.n_embd + 1}
    )
    assert rnn_parameter_count(bigger) > budget
    fixed = config_for_budget(budget, cell="gru", vocab_size=65, n_embd=32)
    assert fixed.n_embd == 32 and rnn_parameter_count(fixed) <= budget


def test_config_refusals_name_the_field() -> None:
    with pytest.raises(LmarchError, match="tie_weights needs n_embd == hidden_size"):
        RNNConfig(n_embd=64, hidden_size=128, tie_weights=True)
    with pytest.raises(LmarchError, match="RNNConfig.cell must be one of"):
        RNNConfig(cell="transformer")
    with pytest.raises(LmarchError, match="RNNConfig.block_size must be an integer >= 1"):
        RNNConfig(block_size=0)
    with pytest.raises(LmarchError, match="no recurrent model of this shape fits in 100"):
        config_for_budget(100, vocab_size=65)
    with pytest.raises(ValueError, match="takes no padding mask"):
        tiny("lstm")(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))


@pytest.mark.parametrize("cell", CELLS)
def test_accelerate_swaps_in_the_fused_kernel_exactly(cell: str) -> None:
    """accelerate(training=True), as the Trainer calls it: the stack becomes the fused one;
    two TBPTT batches give the same losses and gradients (1e-5) as the reference; the state
    dict keeps its keys and tensors, so a checkpoint loads into an unswapped model."""
    reference = tiny(cell).train()
    fused = accelerate(copy.deepcopy(reference), training=True)
    assert isinstance(fused.rnn, FusedRecurrent) and not isinstance(reference.rnn, FusedRecurrent)
    assert list(fused.state_dict()) == list(reference.state_dict())
    ids = torch.randint(11, (3, 2 * 7 + 1), generator=torch.Generator().manual_seed(5))
    losses = (CarriedStateLoss(), CarriedStateLoss())
    for k in range(2):  # the second batch starts from the carried state
        window = ids[:, 7 * k : 7 * k + 8]
        batch = (window[:, :-1], window[:, 1:], torch.full((3,), k == 0))
        results = []
        for model, loss_fn in zip((reference, fused), losses, strict=True):
            model.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            results.append((loss, [p.grad for p in model.parameters()]))
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert abs(loss_a.item() - loss_b.item()) <= 1e-5
        for a, b in zip(grads_a, grads_b, strict=True):
            assert (a - b).abs().max() <= 1e-5
    portable = tiny(cell)
    portable.load_state_dict(fused.state_dict())
    x = ids[:, :7]
    assert (F.softmax(portable.eval()(x), -1) - F.softmax(fused.eval()(x), -1)).abs().max() < 1e-6
