"""A whole LLaMA decoder layer as one native call when decoding one token.

:class:`~lmarch.nn.block.TransformerBlock` runs a pre-norm LLaMA layer as ~25 PyTorch
operators. While decoding a single token on a CPU each of them costs more to dispatch than to
compute: for SmolLM2-135M in Q4_1 the products themselves take ~11 ms a token and the
operators around them as much again. :class:`NativeDecoderBlock` is the same block (same
submodules, same state dict) whose forward hands a one-token step to ``decoder.c``, which
evaluates

    x <- x + W_o Attn(RoPE(W_qkv RMSNorm(x)), cache)
    x <- x + W_down (SiLU(W_gate RMSNorm(x)) * (W_up RMSNorm(x)))

in one OpenMP parallel region, writing the new key and value into the static cache itself.
Everything else (prompts, batches, training, other devices, ``torch.compile``) takes the
PyTorch path, which stays the reference the native one is tested against.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch import native
from lmarch.nn.attention import MultiHeadAttention
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cache import KVCache
from lmarch.nn.ffn import GatedMLP
from lmarch.nn.norm import RMSNorm
from lmarch.nn.position import RotaryEmbedding
from lmarch.quant.blockq import BlockQ4GatedMLP, BlockQ4Linear, BlockQ8Linear

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_FORMATS = {BlockQ4Linear: 0, BlockQ8Linear: 1}  # decoder.c's MAT_Q4_1, MAT_Q8_0


class _Matrix(ctypes.Structure):
    _fields_ = [("type", _I64), ("codes", _PTR), ("constants", _PTR)]


class _Layer(ctypes.Structure):
    """decoder.c's ``lmarch_layer``: shapes and weight addresses of one layer."""

    _fields_ = [
        *((name, _I64) for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "rotary_dim")),
        ("hidden", _I64),
        ("eps", ctypes.c_float),
        ("norm_attn", _PTR),
        ("norm_ffn", _PTR),
        *((name, _Matrix) for name in ("qkv", "out", "gate_up", "down")),
    ]


def _block_layer(layer: nn.Module) -> bool:
    return type(layer) in _FORMATS and layer.bias is None


def _matrix(layer: BlockQ4Linear | BlockQ8Linear) -> tuple[int, Tensor, Tensor]:
    constants = layer.dm if isinstance(layer, BlockQ4Linear) else layer.d
    return _FORMATS[type(layer)], layer.codes, constants


def _swiglu_layers(ffn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(gate_up, down) of a SwiGLU block whose layers are block-quantised, else None."""
    if isinstance(ffn, BlockQ4GatedMLP):
        return ffn.gate_up, ffn.down
    if (
        isinstance(ffn, GatedMLP)
        and ffn.act is F.silu
        and _block_layer(ffn.gate_up)
        and _block_layer(ffn.down)
    ):
        return ffn.gate_up, ffn.down
    return None


def can_fuse(block: nn.Module) -> bool:
    """True for a pre-norm block of RMSNorm, causal attention and SwiGLU whose four matrices are
    Q4_1 or Q8_0 layers without biases (a LLaMA layer after ``quantize_(model, "q4"|"q8")``)."""
    if type(block) is not TransformerBlock or not block.pre_norm:
        return False
    attn = block.attn
    return (
        isinstance(attn, MultiHeadAttention)
        and attn.causal
        and attn.head_dim % 2 == 0
        and _block_layer(attn.qkv)
        and _block_layer(attn.out)
        and type(block.norm_attn) is RMSNorm
        and type(block.norm_ffn) is RMSNorm
        and _swiglu_layers(block.ffn) is not None
    )


class NativeDecoderBlock(TransformerBlock):
    """A :class:`TransformerBlock` (pre-norm RMSNorm / RoPE attention / SwiGLU, block-quantised
    matrices) whose one-token decoding steps run as one call of ``decoder.c``.

    The addresses of the weights are read once and kept (with references to the tensors) so a
    step costs ~10 us of Python; ``.to()``/``.float()`` and ``load_state_dict`` refresh them.
    After replacing a weight tensor by hand, call :meth:`refresh`.
    """

    decodes_natively = True  # generation skips torch.compile for models with such blocks

    def __init__(self, block: TransformerBlock) -> None:
        if not can_fuse(block):
            raise ValueError("not a pre-norm RMSNorm/SwiGLU block with block-quantised weights")
        super().__init__(block.attn, block.ffn, block.norm_attn, block.norm_ffn, pre_norm=True)
        self.train(block.training)
        self.refresh()

    def refresh(self) -> None:
        """Forget the weight addresses; the next native step reads them again."""
        self._spec: _Layer | None = None
        self._held: list[Tensor] = []  # the tensors whose addresses _spec holds
        self._rope: tuple = (None,)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # copies and pickles re-read the addresses
        state.update(_spec=None, _held=[], _rope=(None,))
        return state

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self.refresh()  # .to(), .float(), .cpu() ... may move every weight
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.refresh()  # load_state_dict(assign=True) replaces the tensors
        super()._load_from_state_dict(*args, **kwargs)

    def _layer_spec(self) -> _Layer | None:
        """The C description of this layer; None when a weight is not where the kernel can
        read it (another dtype or device)."""
        if self._spec is not None:
            return self._spec
        attn, (gate_up, down) = self.attn, _swiglu_layers(self.ffn)  # type: ignore[misc]
        matrices = [_matrix(layer) for layer in (attn.qkv, attn.out, gate_up, down)]
        held = [self.norm_attn.weight, self.norm_ffn.weight]
        held += [t for _, codes, constants in matrices for t in (codes, constants)]
        if any(w.dtype != torch.float32 for w in held[:2]) or not all(
            w.device.type == "cpu" and w.is_contiguous() for w in held
        ):
            return None
        spec = _Layer(
            dim=attn.out.out_features,
            n_heads=attn.n_heads,
            n_kv_heads=attn.n_kv_heads,
            head_dim=attn.head_dim,
            rotary_dim=0,
            hidden=down.in_features,
            eps=self.norm_attn.eps,
            norm_attn=held[0].data_ptr(),
            norm_ffn=held[1].data_ptr(),
        )
        for name, (kind, codes, constants) in zip(("qkv", "out", "gate_up", "down"), matrices):
            setattr(spec, name, _Matrix(kind, codes.data_ptr(), constants.data_ptr()))
        self._spec, self._held = spec, held
        return spec

    def _angles(self, rotary: RotaryEmbedding) -> tuple:
        """(rotary module, its table version, cos, sin, their addresses, rotary width, positions),
        cached per module and table version (the tensors are held, so the addresses stay
        valid); (None,) when the kernel cannot read the tables."""
        rope = self._rope
        if rope[0] is rotary and rope[1] == rotary.tables_version:
            return rope
        cos, sin = rotary.cos, rotary.sin
        if cos.dtype != torch.float32 or sin.dtype != torch.float32:
            return (None,)
        cos, sin = cos.contiguous(), sin.contiguous()
        self._rope = (rotary, rotary.tables_version, cos, sin, cos.data_ptr(), sin.data_ptr())
        self._rope += (rotary.rotary_dim, rotary.max_positions)
        return self._rope

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        qk_transform=None,  # type: ignore[no-untyped-def]
    ) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]; one native call for B = T = 1 with a cache (eager CPU
        inference in float32, rotary or no positions), :meth:`TransformerBlock.forward`
        otherwise."""
        plan = self._native_plan(x, attention_mask, cache, start, qk_transform, layer_index)
        if plan is not None:
            return self._native_step(x, start, *plan)
        return super().forward(
            x,
            attention_mask=attention_mask,
            cache=cache,
            layer_index=layer_index,
            start=start,
            qk_transform=qk_transform,
        )

    def _native_plan(self, x, attention_mask, cache, start, rotary, layer_index):  # type: ignore[no-untyped-def]
        """(library, layer spec, keys, values, cache length, angles) when this call can be
        one native step, else None."""
        if not (
            cache is not None
            and attention_mask is None
            and type(start) is int
            and x.is_cpu
            and x.dtype == torch.float32
            and x.shape[:2] == (1, 1)
            and not self.training
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()  # a compiled graph keeps the operators
        ):
            return None
        lib = native.native_library()
        spec = self._layer_spec() if lib is not None else None
        keys, values = cache.buffers(layer_index)
        if spec is None or keys.dtype != torch.float32 or not keys.is_contiguous():
            return None
        if rotary is None:
            rope = (None, None, None, None, None, None, 0, cache.max_len)
        elif isinstance(rotary, RotaryEmbedding):
            rope = self._angles(rotary)
            if rope[0] is None:
                return None
        else:
            return None
        return lib, spec, keys, values, cache.max_len, rope

    @staticmethod
    def _native_step(x, start, lib, spec, keys, values, max_len, rope):  # type: ignore[no-untyped-def]
        *_, cos, sin, width, positions = rope
        if start >= min(max_len, positions):
            raise ValueError(f"position {start} is past the KV cache ({max_len}) or RoPE table")
        spec.rotary_dim = width
        if width:
            cos, sin = cos + 4 * start * width, sin + 4 * start * width  # this position's row
        y = x.clone(memory_format=torch.contiguous_format)
        status = lib.lmarch_decoder_layer(
            ctypes.byref(spec), y.data_ptr(), keys.data_ptr(), values.data_ptr(), max_len,
            cos, sin, start, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError(f"lmarch_decoder_layer: no memory for a step at position {start}")
        return y


def fuse_decoder_blocks_(model: nn.Module) -> int:
    """Replace, in place, every block of ``model`` that :func:`can_fuse` accepts by a
    :class:`NativeDecoderBlock` (same parameters and state dict); returns how many. Does
    nothing (returns 0) when the native kernels are unavailable."""
    if not native.native_available():
        return 0
    fused = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if can_fuse(child):
                setattr(module, name, NativeDecoderBlock(child))
                fused += 1
    return fused


__all__ = ["NativeDecoderBlock", "can_fuse", "fuse_decoder_blocks_"]
