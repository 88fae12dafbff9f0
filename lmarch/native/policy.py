"""Which modules and calls lmarch's native fast paths take: the one policy, in one place.

Every fast path is a module of :mod:`lmarch.native` swapped in from outside by
:func:`lmarch.native.accelerate`; each has two checks here.

- **Structural, at swap time** (``swaps_*``): is the module the structure the native one
  reproduces exactly? Module types (a LoRA-wrapped or quantised ``Linear`` is not an
  ``nn.Linear``, so its block is simply not swapped), float32 weights, the paper's softmax scale,
  no hooks on the parts a fused call would skip.
- **Per call** (``*_call``): are these tensors ones the kernel takes? CPU, float32, no autocast,
  the lengths the kernel handles, no cache, mask or query/key hook. A call that fails it runs
  the reference module's own forward. What can change after the swap (``.double()``, a hook
  added later, LoRA injected later, ``implementation = "reference"``) is checked here too, so a
  late change never meets a stale decision.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.nn.attention import MultiHeadAttention
from lmarch.nn.block import TransformerBlock
from lmarch.nn.ffn import MLP, GatedMLP, gelu_tanh
from lmarch.nn.norm import LayerNorm, RMSNorm

# Causal self-attention up to this length runs on lmarch's kernel (attention.c: ~2x PyTorch's
# fused kernel, forward + backward, at a small GPT's T = 64); longer, on PyTorch's SDPA.
NATIVE_MAX_LEN = 512
# Below this many elements a native GELU call costs more than PyTorch's kernel.
GELU_MIN_ELEMENTS = 4096


_TANH_GELUS: list[Any] = [gelu_tanh]  # and the swapped-in one, added on first use


def _tanh_gelus() -> list[Any]:
    """GPT-2's GELU, as written in ``nn`` and as swapped in (imported late: it imports this)."""
    if len(_TANH_GELUS) == 1:
        from lmarch.native.activations import fast_gelu_tanh

        _TANH_GELUS.append(fast_gelu_tanh)
    return _TANH_GELUS


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# ---- GELU ---------------------------------------------------------------------------------


def swaps_gelu(module: nn.Module) -> bool:
    """A module whose ``act`` is GPT-2's tanh GELU (:func:`lmarch.nn.ffn.gelu_tanh`)."""
    return getattr(module, "act", None) is gelu_tanh


def gelu_call(x: Tensor) -> bool:
    """A float32 CPU tensor large enough for the native call to pay."""
    return x.is_cpu and x.dtype == torch.float32 and x.numel() >= GELU_MIN_ELEMENTS


# ---- causal self-attention ----------------------------------------------------------------


def _plain_attention(attn: nn.Module) -> bool:
    """No QK-norm, sliding window or logit soft-capping (Qwen3, Mistral, Gemma): the kernels
    compute none of them."""
    return (
        getattr(attn, "q_norm", None) is None
        and getattr(attn, "sliding_window", None) is None
        and getattr(attn, "logit_softcap", None) is None
    )


def _plain_block(block: nn.Module) -> bool:
    """No norms on the sublayer outputs (Gemma's sandwich): the fused blocks apply none."""
    return (
        getattr(block, "post_norm_attn", None) is None
        and getattr(block, "post_norm_ffn", None) is None
    )


def _attention_shape(attn: nn.Module) -> bool:
    """Plain causal multi-head (or grouped-query) attention of head width a multiple of 16 with
    the default softmax scale: what ``attention.c`` computes."""
    return (
        isinstance(attn, MultiHeadAttention)
        and attn.causal
        and attn.head_dim % 16 == 0
        and attn.softmax_scale is None
        and _plain_attention(attn)
    )


def swaps_causal_attention(module: nn.Module) -> bool:
    """A :class:`~lmarch.nn.attention.MultiHeadAttention` (exactly; not already swapped) that
    ``attention.c`` reproduces. Its projections may be any layers (LoRA, quantised): the kernel
    replaces only the step between them."""
    return type(module) is MultiHeadAttention and _attention_shape(module)


def causal_attention_call(
    attn: MultiHeadAttention,
    qkv: Tensor,
    attention_mask: Tensor | None,
    cache: Any,
    qk_transform: Any,
    allow_dropout: bool = False,
) -> bool:
    """Plain causal self-attention over the projection ``qkv`` [B, T, width]: float32 on the CPU
    (so not under bf16 autocast), no cache, mask or position hook, 2 <= T <= NATIVE_MAX_LEN, the
    ``sdpa`` implementation (``reference`` stays written out), and no dropout in training unless
    ``allow_dropout`` (the fused GPT-2 block draws its own)."""
    return (
        cache is None
        and attention_mask is None
        and qk_transform is None
        and _plain_attention(attn)
        and attn.implementation == "sdpa"
        and attn.softmax_scale is None
        and (attn.dropout == 0.0 or not attn.training or allow_dropout)
        and qkv.is_cpu
        and qkv.dtype == torch.float32
        and 2 <= qkv.shape[1] <= NATIVE_MAX_LEN
    )


# ---- the GPT-2 block ----------------------------------------------------------------------


def _gpt_block_parts(block: TransformerBlock) -> bool:
    """Pre-LN LayerNorms, a GELU MLP (tanh or erf form), attention that ``attention.c`` takes with
    one dropout rate for its probabilities and its output, plain ``nn.Linear`` projections with
    float32 weights, and no hooks on the parts (the fused call would skip them)."""
    attn, ffn, n1, n2 = block.attn, block.ffn, block.norm_attn, block.norm_ffn
    if not (
        block.pre_norm
        and _plain_block(block)
        and type(n1) is LayerNorm
        and type(n2) is LayerNorm
        and type(ffn) is MLP
        and (ffn.act is F.gelu or ffn.act in _tanh_gelus())
        and _attention_shape(attn)
        and attn.resid_dropout.p == attn.dropout
    ):
        return False
    linears = (attn.qkv, attn.out, ffn.fc_in, ffn.fc_out)
    if any(type(m) is not nn.Linear for m in linears):
        return False
    return all(m.weight.dtype == torch.float32 for m in (*linears, n1, n2)) and not _hooked(
        attn, ffn, *linears, n1, n2
    )


def swaps_gpt_block(module: nn.Module) -> bool:
    """A :class:`~lmarch.nn.block.TransformerBlock` (exactly; not already swapped) that
    ``gpt_block.c`` computes as one call: see :func:`_gpt_block_parts`."""
    return type(module) is TransformerBlock and _gpt_block_parts(module)


def gpt_block_call(
    block: TransformerBlock,
    x: Tensor,
    attention_mask: Tensor | None,
    cache: Any,
    qk_transform: Any,
) -> bool:
    """x [B, T, C] float32 on the CPU, no autocast, plain causal self-attention (dropout
    included), and the parts still what was swapped."""
    return (
        x.dim() == 3
        and not torch.is_autocast_enabled("cpu")
        and causal_attention_call(
            block.attn, x, attention_mask, cache, qk_transform, allow_dropout=True
        )
        and _gpt_block_parts(block)
    )


# ---- block-quantised LLaMA layers (inference) ---------------------------------------------


def block_kernel_call(x: Tensor) -> bool:
    """A block-quantised product on the native kernel: CPU input, no gradient wanted (the
    kernels have no backward; training multiplies by the dequantised weight)."""
    return x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())


@cache
def _block_classes() -> tuple[type, type]:
    """(BlockQ4Linear, BlockQ8Linear), imported once (``quant.blockq`` imports this module)."""
    from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear

    return BlockQ4Linear, BlockQ8Linear


def _block_layer(layer: nn.Module) -> bool:
    return type(layer) in _block_classes() and layer.bias is None


def swiglu_layers(ffn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(gate_up, down) of a SwiGLU :class:`~lmarch.nn.ffn.GatedMLP` whose two layers are
    block-quantised without biases, else None."""
    swiglu = isinstance(ffn, GatedMLP) and ffn.act is F.silu
    if swiglu and _block_layer(ffn.gate_up) and _block_layer(ffn.down):
        return ffn.gate_up, ffn.down
    return None


def _q4_swiglu(module: nn.Module) -> bool:
    """SwiGLU over two Q4_1 layers without biases (what ``lmarch_q4_1_swiglu`` reads)."""
    q4 = _block_classes()[0]
    return (
        swiglu_layers(module) is not None and type(module.gate_up) is q4 and type(module.down) is q4
    )


def swaps_swiglu(module: nn.Module) -> bool:
    """A SwiGLU :class:`~lmarch.nn.ffn.GatedMLP` (exactly) over two Q4_1 layers without biases:
    ``lmarch_q4_1_swiglu`` computes it as one call."""
    return type(module) is GatedMLP and _q4_swiglu(module) and module.gate_up.native


def swiglu_call(module: nn.Module, x: Tensor) -> bool:
    """The fused SwiGLU call: as any block-quantised product, while both layers still are the
    Q4_1 layers it was swapped for (an adapter added later wraps them: the reference runs)."""
    return block_kernel_call(x) and _q4_swiglu(module)


def _decoder_layers(block: nn.Module) -> bool:
    """The four block-quantised matrices ``decoder.c`` reads, still in place."""
    attn = block.attn
    return (
        _block_layer(attn.qkv) and _block_layer(attn.out) and swiglu_layers(block.ffn) is not None
    )


def swaps_decoder_layer(module: nn.Module) -> bool:
    """A pre-norm :class:`~lmarch.nn.block.TransformerBlock` (exactly) of RMSNorms, causal
    attention with the default scale and SwiGLU whose four matrices are Q4_1 or Q8_0 layers
    without biases (a LLaMA layer after ``quantize_(model, "q4"|"q8")`` or read from a GGUF
    file): ``decoder.c`` runs its one-token steps as one call."""
    if type(module) is not TransformerBlock or not module.pre_norm or not _plain_block(module):
        return False
    attn = module.attn
    return (
        isinstance(attn, MultiHeadAttention)
        and attn.causal
        and attn.softmax_scale is None
        and _plain_attention(attn)
        and attn.head_dim % 2 == 0
        and type(module.norm_attn) is RMSNorm
        and type(module.norm_ffn) is RMSNorm
        and _decoder_layers(module)
    )


def decoder_step_call(
    block: nn.Module,
    x: Tensor,
    attention_mask: Tensor | None,
    cache: Any,
    start: Any,
) -> bool:
    """One new token (B = T = 1) over a cache, in eager float32 CPU inference, at a Python int
    position (a compiled graph keeps the PyTorch operators), while the layer's four matrices
    are still the block-quantised layers it was swapped for (not wrapped by an adapter since)."""
    return (
        cache is not None
        and attention_mask is None
        and type(start) is int
        and x.is_cpu
        and x.dtype == torch.float32
        and x.shape[:2] == (1, 1)
        and not block.training
        and not (x.requires_grad and torch.is_grad_enabled())
        and block.attn.softmax_scale is None
        and not torch.compiler.is_compiling()
        and _decoder_layers(block)
    )


__all__ = [
    "GELU_MIN_ELEMENTS",
    "NATIVE_MAX_LEN",
    "block_kernel_call",
    "causal_attention_call",
    "decoder_step_call",
    "gelu_call",
    "gpt_block_call",
    "swaps_causal_attention",
    "swaps_decoder_layer",
    "swaps_gelu",
    "swaps_gpt_block",
    "swaps_swiglu",
    "swiglu_call",
    "swiglu_layers",
]
