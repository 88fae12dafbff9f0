"""The native fast paths leave the LLaMA variants they do not compute to the reference.

``decoder.c`` runs a plain LLaMA layer (RMSNorm, RoPE attention, SwiGLU) and ``attention.c``
plain causal attention. A quantised Qwen3 (QK-norm), Mistral (sliding window) or Gemma-style
layer (sandwich norms, soft caps) must not be swapped for them: accelerating such a model swaps
no decoder layer and leaves its logits as they were (to 1e-4: the fused SwiGLU kernel, which
these layers may still take, rounds in another order) and its greedy tokens exactly, while a
plain LLaMA of the same shape is swapped (the control). Without a C compiler the native paths do not exist and these
tests are skipped (tests/native/test_native_off.py covers that case).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmarch import native
from lmarch.generation import generate
from lmarch.models.llama import Llama, LlamaConfig
from lmarch.native import accelerate
from lmarch.native.swaps import native_modules
from lmarch.quant.apply import quantize_

pytestmark = pytest.mark.skipif(
    not native.native_available(),
    reason="lmarch's native kernels are unavailable here: nothing is swapped",
)

_SHAPE = dict(
    vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
    intermediate_size=224,
)  # fmt: skip
VARIANTS = {
    "qk_norm": dict(qk_norm=True),
    "sliding_window": dict(sliding_window=3),
    "sandwich_softcap": dict(sandwich_norm=True, attn_logit_softcap=2.0),
}


def _quantised(**overrides) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**_SHAPE, **overrides)).eval()
    quantize_(model, "q4")
    return model


def test_a_plain_llama_is_swapped() -> None:
    model = accelerate(_quantised(), training=False)
    assert native_modules(model)["NativeDecoderBlock"] == 2


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_variant_keeps_its_reference_layers_and_its_outputs(name: str) -> None:
    reference = _quantised(**VARIANTS[name])
    fast = accelerate(copy.deepcopy(reference), training=False)
    swapped = native_modules(fast)
    assert swapped["NativeDecoderBlock"] == 0 and swapped["NativeCausalAttention"] == 0
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (fast(ids) - reference(ids)).abs().max().item() <= 1e-4
    assert torch.equal(generate(fast, ids, 8), generate(reference, ids, 8))
