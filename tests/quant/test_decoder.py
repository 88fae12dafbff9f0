"""The native decoder layer (decoder.c) against the PyTorch block it replaces.

Both run the same block-quantised weights through the same product kernels, so they differ
only by float rounding order and by the 16-bit activation codes (a code can round the other
way when its input moved by one ulp): one layer agrees to ~1e-7 of its output's size (as
much as the PyTorch block moves when its input is scaled by 1 + 1e-7); over 3 random layers and
12 steps the small logits drift to ~2e-4 of their size; greedy tokens agree.

Without a C compiler these tests are skipped; tests/native/test_native_off.py shows the float
fallback then.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmarch import native
from lmarch.generation.generate import _COMPILED_STEPS, iter_tokens
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.native import accelerate, policy
from lmarch.native.decoder import NativeDecoderBlock
from lmarch.native.swaps import native_modules
from lmarch.nn.block import TransformerBlock
from lmarch.quant.apply import quantize_

pytestmark = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here (no working C compiler, or "
    "LMARCH_NATIVE=0): nothing native to test",
)

LAYER = 1e-5  # max |native - pytorch| / max |pytorch| for one layer (measured ~1e-7)
RELATIVE = 5e-4  # the same for logits after 12 steps of 3 layers (measured <= 1.8e-4)


def _config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=96,
        block_size=64,
        n_layer=3,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        intermediate_size=224,
    )
    return LlamaConfig(**{**base, **overrides})


def _pair(scheme: str = "q4", **overrides) -> tuple[Llama, Llama]:
    """(PyTorch reference, native) copies of one random quantised Llama, both accelerated for
    inference; the reference's layers are turned back into the PyTorch block (its SwiGLU stays
    one native call, so the two differ only in the decoder layer)."""
    torch.manual_seed(0)
    model = Llama(_config(**overrides)).eval()
    with torch.no_grad():  # lively norms, so every step of the layer matters
        for block in model.blocks:
            block.norm_attn.weight.uniform_(0.5, 1.5)
            block.norm_ffn.weight.uniform_(0.5, 1.5)
    quantize_(model, scheme)
    accelerate(model, training=False)
    assert native_modules(model)["NativeDecoderBlock"] == model.config.n_layer
    assert native_modules(model)["NativeSwiGLU"] == (model.config.n_layer if scheme == "q4" else 0)
    fused = copy.deepcopy(model)
    for block in model.blocks:
        block.__class__ = TransformerBlock
    return model, fused


def _decode(model: Llama, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], object]:
    """Logits of ``steps`` one-token steps after a prompt (fixed tokens fed in)."""
    cache = model.make_cache(1, model.config.block_size)
    with torch.no_grad():
        model(ids, cache=cache, start=0)
        tokens = [torch.tensor([[(7 * i + 2) % 96]]) for i in range(steps)]
        out = [model(t, cache=cache, start=ids.shape[1] + i)[:, -1] for i, t in enumerate(tokens)]
    return out, cache


@pytest.mark.parametrize(
    "scheme, overrides",
    [
        ("q4", {}),  # grouped-query attention, Q4_1 everywhere, fused SwiGLU module
        ("q8", {}),  # Q8_0 matrices, SwiGLU as two layers
        ("q4", {"n_kv_head": 1, "partial_rotary_factor": 0.5}),  # multi-query, partial RoPE
        ("q4", {"n_kv_head": 4, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ],
)
def test_native_steps_equal_the_pytorch_block(scheme: str, overrides: dict) -> None:
    reference, fused = _pair(scheme, **overrides)
    ids = torch.tensor([[5, 17, 3, 88, 41, 9, 60]])
    torch.manual_seed(1)
    x = torch.randn(1, 1, reference.config.n_embd)
    with torch.no_grad():
        layers = []
        for model in (reference, fused):
            cache = model.make_cache(1, 16)
            model(ids, cache=cache, start=0)
            layers.append(
                model.blocks[1](x, cache=cache, layer_index=1, start=7, qk_transform=model.rotary)
            )
    assert (layers[0] - layers[1]).abs().max().item() <= LAYER * layers[0].abs().max().item()
    want, want_cache = _decode(reference, ids, 12)
    got, got_cache = _decode(fused, ids, 12)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() <= RELATIVE * w.abs().max().item()
    n = ids.shape[1] + 12
    for ours, theirs in ((got_cache.keys, want_cache.keys), (got_cache.values, want_cache.values)):
        scale = theirs[..., :n, :].abs().max().item()
        assert (ours[..., :n, :] - theirs[..., :n, :]).abs().max().item() <= RELATIVE * scale
        assert ours[..., n:, :].abs().max().item() == 0.0  # nothing written past the position


def test_greedy_generation_is_unchanged_and_skips_compilation(monkeypatch) -> None:
    reference, fused = _pair("q4")
    calls = []
    step = NativeDecoderBlock._native_step
    counted = staticmethod(lambda *args: calls.append(1) or step(*args))
    monkeypatch.setattr(NativeDecoderBlock, "_native_step", counted)
    ids = torch.tensor([[1, 2, 3]])
    want = [int(t) for t in iter_tokens(reference, ids, 40)]
    got = [int(t) for t in iter_tokens(fused, ids, 40, compile=True)]
    assert got == want
    assert len(calls) == 39 * reference.config.n_layer  # every step after the prompt, native
    assert fused not in _COMPILED_STEPS  # one native call a layer: nothing left to compile


def test_prompts_batches_and_training_take_the_pytorch_path() -> None:
    reference, fused = _pair("q4")
    ids = torch.tensor([[4, 8, 15, 16, 23], [42, 4, 8, 15, 16]])
    with torch.no_grad():  # a prompt and a batch: the very same operators, bit for bit
        assert torch.equal(fused(ids), reference(ids))
        c1, c2 = reference.make_cache(2, 16), fused.make_cache(2, 16)
        assert torch.equal(fused(ids, cache=c2, start=0), reference(ids, cache=c1, start=0))
        one = ids[:, :1]
        assert torch.equal(fused(one, cache=c2, start=5), reference(one, cache=c1, start=5))


def test_portable_c_path_agrees_with_the_vector_path(tmp_path) -> None:
    """The layer built without SIMD flags (plain C) against the AVX2 build used here."""
    _, fused = _pair("q4")
    block = fused.blocks[0]
    portable = native.load(native.build([], tmp_path))
    x = torch.randn(1, 1, 128)
    cache = fused.make_cache(1, 16)
    with torch.no_grad():
        fused(torch.tensor([[3, 1, 4, 1, 5]]), cache=cache, start=0)
    outputs = []
    for lib in (native.native_library(), portable):
        plan = list(block._native_plan(x, None, copy.deepcopy(cache), 5, fused.rotary, 0))
        plan[0] = lib
        outputs.append(block._native_step(x, 5, *plan))
    assert (outputs[0] - outputs[1]).abs().max().item() <= LAYER * outputs[0].abs().max().item()


def test_replaced_weights_are_picked_up() -> None:
    """load_state_dict(assign=True) swaps every tensor; the layer reads the new ones."""
    _, fused = _pair("q4")
    other, _ = _pair("q4")
    with torch.no_grad():  # same shapes, other weights
        for block in other.blocks:
            block.norm_ffn.weight.mul_(-1.0)
    ids = torch.tensor([[7, 3, 9]])
    before, _ = _decode(fused, ids, 2)
    fused.load_state_dict(other.state_dict(), assign=True)
    want, _ = _decode(other, ids, 2)
    got, _ = _decode(fused, ids, 2)
    assert (want[1] - got[1]).abs().max().item() <= RELATIVE * want[1].abs().max().item()
    assert (before[1] - got[1]).abs().max().item() > 100 * RELATIVE * want[1].abs().max().item()


def test_fused_models_copy_and_pickle(tmp_path) -> None:
    reference, fused = _pair("q4")
    ids = torch.tensor([[7, 3, 9]])
    _decode(fused, ids, 1)  # the addresses are read
    copied = copy.deepcopy(fused)
    torch.save(fused, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    want, _ = _decode(reference, ids, 3)
    for model in (copied, loaded):
        got, _ = _decode(model, ids, 3)
        assert (want[2] - got[2]).abs().max().item() <= RELATIVE * want[2].abs().max().item()


def test_only_block_quantised_llama_layers_fuse() -> None:
    torch.manual_seed(0)
    model = Llama(_config())
    assert not policy.swaps_decoder_layer(model.blocks[0])  # float weights: nothing to gain
    accelerate(model, training=False)
    assert native_modules(model)["NativeDecoderBlock"] == 0
    quantize_(model, "q4")
    accelerate(model, training=True)  # training: the inference-only layers are not swapped
    assert native_modules(model)["NativeDecoderBlock"] == 0
    assert native_modules(model)["NativeSwiGLU"] == 0


def test_position_past_the_cache_is_an_error() -> None:
    _, fused = _pair("q4")
    cache = fused.make_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="past the KV cache"):
        fused(torch.tensor([[1]]), cache=cache, start=4)
