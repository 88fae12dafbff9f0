"""PyTorch's CPU flash attention, made differentiable twice.

On the CPU, ``F.scaled_dot_product_attention`` runs a flash kernel whose backward
(``aten::_scaled_dot_product_flash_attention_for_cpu_backward``) has no derivative of its own:
a second derivative through it (a gradient penalty, a Hessian-vector product) fails with
"derivative for ... is not implemented". :class:`CpuFlashAttention` calls the same two kernels
for the ordinary forward and backward, so first-order results are PyTorch's own, and only when
the backward is itself being recorded (``create_graph=True``) computes the gradients from
PyTorch's math backend instead: the same equation, softmax(q k^T * scale + M) v, written as
ordinary differentiable operations, so they can be differentiated again.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_MATH = torch.ops.aten._scaled_dot_product_attention_math.default
# PyTorch's own choice of SDPA kernel for given inputs; absent in some builds (then we never wrap)
_CHOICE = getattr(torch, "_fused_sdp_choice", None)
_FLASH_CHOICE = int(SDPBackend.FLASH_ATTENTION)
# torch.func transforms (grad, vmap) wrap tensors that an autograd.Function would have to declare
# rules for; under them plain SDPA runs, as before
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def picks_cpu_flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> bool:
    """Whether ``F.scaled_dot_product_attention`` would run its CPU flash kernel here while
    autograd records: the only case where its backward cannot be differentiated again.

    The cheap tests come first so that inference and the other devices pay almost nothing;
    the kernel choice itself is PyTorch's (``torch._fused_sdp_choice``), not a copy of its rules.
    """
    return (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and (mask is None or mask.dtype == torch.bool)
        and _CHOICE is not None
        and not torch.compiler.is_compiling()  # compiled graphs get their own backward
        and not _TRANSFORMS_ACTIVE()
        and _CHOICE(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        == _FLASH_CHOICE
    )


class CpuFlashAttention(torch.autograd.Function):
    """SDPA through PyTorch's CPU flash kernels, with a backward that is itself differentiable.

    Inputs as :func:`torch.nn.functional.scaled_dot_product_attention` takes them: q [B, H, T_q, D],
    k/v [B, H_kv, T_k, D] (H a multiple of H_kv), ``mask`` boolean (True = may attend) or None,
    ``is_causal`` top-left aligned as SDPA's, ``scale`` None for 1 / sqrt(D). Dropout is not taken
    (PyTorch's CPU flash kernel does not run with it); check :func:`picks_cpu_flash` first.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
    ) -> Tensor:
        # SDPA hands the flash kernel an additive mask: 0 where allowed, -inf where not
        bias = None if mask is None else q.new_zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        out, logsumexp = _FLASH(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, logsumexp, bias)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, logsumexp, bias = ctx.saved_tensors
        kw = {"attn_mask": bias, "scale": ctx.scale}
        if not torch.is_grad_enabled():  # the usual first-order backward: PyTorch's kernel
            dq, dk, dv = _FLASH_BACKWARD(
                grad_out, q, k, v, out, logsumexp, 0.0, ctx.is_causal, **kw
            )
            return dq, dk, dv, None, None, None
        # create_graph=True: recompute with differentiable operations and differentiate those.
        # Fresh views keep the three roles apart when q, k and v are one tensor (self-attention
        # on a shared input), so each gradient is that role's only.
        qv, kv, vv = q.view_as(q), k.view_as(k), v.view_as(v)
        inputs = [x for x in (qv, kv, vv) if x.requires_grad]
        gqa = k.shape[1] != q.shape[1]
        y, _ = _MATH(qv, kv, vv, bias, 0.0, ctx.is_causal, None, scale=ctx.scale, enable_gqa=gqa)
        grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
        dq, dk, dv = (next(grads) if x.requires_grad else None for x in (qv, kv, vv))
        return dq, dk, dv, None, None, None
