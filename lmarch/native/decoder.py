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
:func:`lmarch.native.accelerate` (``training=False``) swaps it in for the blocks
:func:`lmarch.native.policy.swaps_decoder_layer` accepts; the layer it reads is lmarch.h's
``lmarch_layer``, built by :mod:`lmarch.native.abi` from that header.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lmarch import native
from lmarch.native import abi
from lmarch.native.policy import decoder_step_call, swiglu_layers
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cache import KVCache
from lmarch.nn.position import RotaryEmbedding
from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear

_Layer = abi.STRUCTS["lmarch_layer"]
_Matrix = abi.STRUCTS["lmarch_matrix"]
_FORMATS = {
    BlockQ4Linear: abi.ENUMS["lmarch_matrix_type"]["LMARCH_MAT_Q4_1"],
    BlockQ8Linear: abi.ENUMS["lmarch_matrix_type"]["LMARCH_MAT_Q8_0"],
}


def _matrix(layer: BlockQ4Linear | BlockQ8Linear) -> tuple[int, Tensor, Tensor]:
    constants = layer.dm if isinstance(layer, BlockQ4Linear) else layer.d
    return _FORMATS[type(layer)], layer.codes, constants


class NativeDecoderBlock(TransformerBlock):
    """A :class:`TransformerBlock` (pre-norm RMSNorm / RoPE attention / SwiGLU, block-quantised
    matrices) whose one-token decoding steps run as one call of ``decoder.c``.

    The addresses of the weights are read once and kept (with references to the tensors) so a
    step costs ~10 us of Python; ``.to()``/``.float()`` and ``load_state_dict`` refresh them.
    After replacing a weight tensor by hand, call :meth:`refresh`.
    """

    decodes_natively = True  # generation skips torch.compile for models with such blocks

    def swapped_in(self) -> None:
        """Called by :func:`lmarch.native.accelerate` once this block has become native."""
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
        attn, (gate_up, down) = self.attn, swiglu_layers(self.ffn)  # type: ignore[misc]
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
        if not decoder_step_call(self, x, attention_mask, cache, start):
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


__all__ = ["NativeDecoderBlock"]
