"""The one step that swaps lmarch's native fast paths into a model: :func:`accelerate`.

Each swap is in place and keeps everything a caller may hold: the module's class becomes its
native subclass (the way ``torch.nn.utils.parametrize`` swaps a class), so the object, its
parameters, their state-dict keys, an optimizer's references and any hooks stay what they were;
GPT-2's GELU is a function attribute (``act``), replaced by the native one. Which modules are
swapped is :mod:`lmarch.native.policy`'s decision, made here once; which calls then take a
kernel is decided per call by the same module.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from lmarch.native import native_available, policy
from lmarch.native.activations import fast_gelu_tanh
from lmarch.native.attention import NativeCausalAttention
from lmarch.native.decoder import NativeDecoderBlock
from lmarch.native.fused_recurrent import swap_fused_recurrent
from lmarch.native.gpt_block import NativeGPTBlock
from lmarch.native.swiglu import NativeSwiGLU

# (policy check, native class), in the order they are tried on each module; the inference-only
# ones have no backward (their calls in training fall back anyway).
_TRAINING = (
    (policy.swaps_causal_attention, NativeCausalAttention),
    (policy.swaps_gpt_block, NativeGPTBlock),
)
_INFERENCE = (
    (policy.swaps_swiglu, NativeSwiGLU),
    (policy.swaps_decoder_layer, NativeDecoderBlock),
)


def accelerate(model: nn.Module, *, training: bool) -> nn.Module:
    """Swap every native fast path :mod:`lmarch.native.policy` accepts into ``model``, in place,
    and return it: GPT-2's GELU, causal self-attention and the whole GPT-2 block (forward and
    backward); with ``training=False`` also the SwiGLU MLP over Q4_1 layers and the block-
    quantised LLaMA decoder layer (inference only). The identity when the native library is
    unavailable (``LMARCH_NATIVE=0``, no C compiler), except that recurrent stacks always get
    PyTorch's fused kernel (:mod:`lmarch.native.fused_recurrent`, no native library needed).
    Calling it twice changes nothing more."""
    swap_fused_recurrent(model)
    if not native_available():
        return model
    swaps = _TRAINING if training else _TRAINING + _INFERENCE
    for module in list(model.modules()):
        if policy.swaps_gelu(module):
            module.act = fast_gelu_tanh
        for accepts, native_class in swaps:
            if accepts(module):
                module.__class__ = native_class
                if hasattr(module, "swapped_in"):
                    module.swapped_in()
                break
    return model


def native_modules(model: nn.Module) -> Counter[str]:
    """How many modules of each native kind ``model`` holds (``"gelu"`` counts modules whose
    ``act`` is the native GELU): what :func:`accelerate` swapped in."""
    kinds = (NativeCausalAttention, NativeGPTBlock, NativeSwiGLU, NativeDecoderBlock)
    found: Counter[str] = Counter()
    for module in model.modules():
        found.update(k.__name__ for k in kinds if type(module) is k)
        if getattr(module, "act", None) is fast_gelu_tanh:
            found["gelu"] += 1
    return found


__all__ = ["accelerate", "native_modules"]
