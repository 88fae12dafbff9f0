"""A whole GPT-2 block (pre-LN) as one differentiable call: lmarch's kernels between MKL's products.

For x [N, C] (N = batch x time) the block of Radford et al. 2019 computes

    x1 = x + Attn(LN1(x)) W_o^T + b_o,        Attn = causal softmax(q k^T / sqrt(D)) v per head
    y  = x1 + GELU(LN2(x1) W_fc^T + b_fc) W_pr^T + b_pr      (GPT-2's tanh GELU, or the erf one)

and its backward, in the order below, with every gradient written once:

    db_pr = sum_rows dy        dW_pr = dy^T a              da = dy W_pr        (a = GELU(h))
    dh = GELU'(h) * da         db_fc = sum_rows dh         dW_fc = dh^T LN2(x1)
    (the forward keeps GELU'(h), computed with GELU(h) from the same exponential, not h)
    dx1 = dy + LN2'(dh W_fc)   db_o = sum_rows dx1         dW_o = dx1^T att    datt = dx1 W_o
    dqkv = Attn'(datt)         db_qkv = sum_rows dqkv      dW_qkv = dqkv^T LN1(x)
    dx = dx1 + LN1'(dqkv W_qkv)

Built from modules, the same block is about twenty autograd nodes, each allocating its output
and some (residual adds, bias broadcasts, bias-gradient sums) a pass over memory of their own;
at a small model's sizes the time between the matrix products was a quarter of a training step.
Here LayerNorm, the residual and bias passes, attention and GELU are lmarch's C kernels
(``rows.c``, ``attention.c``, ``activations.c``) and the products are the BLAS PyTorch
uses (MKL's sgemm: the same products the module version computes). Two ways to run it:

- whole sequences per thread (``gpt_block.c``), when PyTorch's sgemm can be called from C
  (:func:`lmarch.native.blas_ready`) and the batch splits evenly: each thread runs the block
  over its sequences from start to finish, no barrier between operations;
- otherwise PyTorch's products (``addmm``, ``mm``) between the same kernels.

:class:`NativeGPTBlock` is the :class:`~lmarch.nn.block.TransformerBlock` that
:func:`lmarch.native.accelerate` swaps in for GPT-2 blocks: this call where
:func:`lmarch.native.policy.gpt_block_call` allows it, the reference forward everywhere else (the
tests hold both to the module path in float64). The order of the twelve parameters and of the
saved tensors is declared once, in ``lmarch.h``. Under ``create_graph=True`` (second derivatives,
e.g. a gradient penalty) the eager backward recomputes the block with PyTorch's operators from
the saved inputs (dropout masks included), so its gradients are differentiable again.
"""

from __future__ import annotations

import ctypes
from collections import namedtuple
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.native import abi, blas_ready, native_library
from lmarch.native.attention import (
    attention_backward,
    attention_forward,
    reference_causal_attention,
)
from lmarch.native.policy import gpt_block_call
from lmarch.nn.attention import QKTransform
from lmarch.nn.block import TransformerBlock
from lmarch.nn.cache import KVCache


class BlockShape(NamedTuple):
    """What the block's tensors do not say: heads, key/value heads, head width, the two eps, and
    the dropout rates in training (attention: its probabilities and its residual branch; MLP:
    its residual branch; 0 when off)."""

    heads: int
    kv_heads: int
    head_dim: int
    eps1: float
    eps2: float
    dropout_attn: float = 0.0
    dropout_mlp: float = 0.0
    exact_gelu: bool = False  # erf GELU (nanoGPT's nn.GELU()) instead of GPT-2's tanh form


def _seeds(seed: int) -> tuple[int, int, int]:
    """Three mask streams (probabilities, attention branch, MLP branch) from one drawn seed."""
    mask = (1 << 64) - 1
    return seed & mask, (seed ^ 0x9E3779B97F4A7C15) & mask, (seed ^ 0xBF58476D1CE4E5B9) & mask


def _add_dropped(base: Tensor | None, o: Tensor, p: float, seed: int) -> Tensor:
    """base + Dropout_p(o) with the mask of stream ``seed`` (``rows.c``)."""
    n, c = o.shape
    out = torch.empty_like(o)
    native_library().lmarch_add_dropped(
        _ptr(base), o.data_ptr(), out.data_ptr(), n, c, 0, p, seed, torch.get_num_threads()
    )
    return out


# The parameters' slots (lmarch.h's lmarch_gpt_param) and where each lives in a TransformerBlock.
_SLOTS = abi.enum_names("lmarch_gpt_param", "LMARCH_GPT_")
_WHERE = {
    "LN1_W": "norm_attn.weight",
    "LN1_B": "norm_attn.bias",
    "QKV_W": "attn.qkv.weight",
    "QKV_B": "attn.qkv.bias",
    "OUT_W": "attn.out.weight",
    "OUT_B": "attn.out.bias",
    "LN2_W": "norm_ffn.weight",
    "LN2_B": "norm_ffn.bias",
    "FC_W": "ffn.fc_in.weight",
    "FC_B": "ffn.fc_in.bias",
    "PR_W": "ffn.fc_out.weight",
    "PR_B": "ffn.fc_out.bias",
}
if set(_WHERE) != set(_SLOTS):
    raise RuntimeError(f"lmarch.h's GPT-2 block slots {_SLOTS} differ from gpt_block.py's")
# The parameters as state-dict keys of the block, in the kernel's order (None: an absent bias).
BLOCK_PARAMETERS = tuple(_WHERE[slot] for slot in _SLOTS)
N_PARAMS = len(BLOCK_PARAMETERS)
Params = namedtuple("Params", [slot.lower() for slot in _SLOTS])  # type: ignore[misc]
Saved = namedtuple(  # type: ignore[misc]
    "Saved", [slot.lower() for slot in abi.enum_names("lmarch_gpt_saved", "LMARCH_GPT_SAVED_")]
)
_PATHS = tuple(tuple(key.split(".")) for key in BLOCK_PARAMETERS)


def _block_parameters(block: nn.Module) -> list[Tensor | None]:
    found = []
    for path in _PATHS:  # a plain loop: torch.compile traces it (not operator.attrgetter)
        value = block
        for name in path:
            value = getattr(value, name)
        found.append(value)
    return found


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _layer_norm(x: Tensor, g: Tensor, b: Tensor | None, eps: float) -> tuple[Tensor, ...]:
    n, c = x.shape
    y, mean, rstd = torch.empty_like(x), x.new_empty(n), x.new_empty(n)
    native_library().lmarch_layer_norm_forward(
        x.data_ptr(), g.data_ptr(), _ptr(b), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        n, c, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y, mean, rstd


def _layer_norm_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, g: Tensor, residual: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    n, c = x.shape
    dx, dg = torch.empty_like(x), g.new_empty(c)
    db = g.new_empty(c) if has_bias else None
    status = native_library().lmarch_layer_norm_backward(
        dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), g.data_ptr(),
        residual.data_ptr(), dx.data_ptr(), dg.data_ptr(), _ptr(db), n, c,
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("lmarch_layer_norm_backward: out of memory")
    return dx, dg, db


def _plus_bias(base: Tensor, bias: Tensor | None) -> Tensor:
    """base + bias broadcast over rows, into a new tensor (the product is then added in place)."""
    n, c = base.shape
    out = torch.empty_like(base)
    native_library().lmarch_rows_plus_bias(
        base.data_ptr(), _ptr(bias), out.data_ptr(), n, c, torch.get_num_threads()
    )
    return out


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def _bias_grad(d: Tensor, bias: Tensor | None, scale: Tensor | None = None) -> Tensor | None:
    """The gradient of ``bias`` (sum of d's rows), after d *= scale in place when given."""
    if bias is None and scale is None:
        return None
    out = None if bias is None else bias.new_empty(d.shape[1])
    if native_library().lmarch_mul_column_sums(
        d.data_ptr(), _ptr(scale), _ptr(out), d.shape[0], d.shape[1], torch.get_num_threads()
    ):
        raise MemoryError("lmarch_mul_column_sums: out of memory")
    return out


def _gelu_with_slope(h: Tensor, exact: bool) -> tuple[Tensor, Tensor]:
    a, slope = torch.empty_like(h), torch.empty_like(h)
    lib = native_library()
    fn = lib.lmarch_gelu_erf_forward_slope if exact else lib.lmarch_gelu_tanh_forward_slope
    fn(h.data_ptr(), a.data_ptr(), slope.data_ptr(), h.numel(), torch.get_num_threads())
    return a, slope


def _threaded(batch: int) -> bool:
    """Whether to run the block with whole sequences per thread (``gpt_block.c``): PyTorch's BLAS
    is callable from C and the sequences split evenly enough across the threads."""
    threads = torch.get_num_threads()
    return blas_ready() and (batch % threads == 0 or batch >= 4 * threads)


def _pointers(tensors: list[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[_ptr(t) for t in tensors])


def _c_shape(x: Tensor, params: list[Tensor | None], shape: BlockShape, seed: int):  # type: ignore[no-untyped-def]
    """lmarch.h's ``lmarch_gpt_shape`` for this call."""
    b, t, c = x.shape
    seed_probs, seed_attn, seed_mlp = _seeds(seed)
    return abi.STRUCTS["lmarch_gpt_shape"](
        batch=b, t=t, c=c, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        hidden=Params(*params).fc_w.shape[0], exact_gelu=int(shape.exact_gelu), eps1=shape.eps1,
        eps2=shape.eps2, dropout_attn=shape.dropout_attn, dropout_mlp=shape.dropout_mlp,
        seed_probs=seed_probs, seed_attn=seed_attn, seed_mlp=seed_mlp,
    )  # fmt: skip


def _saved_sizes(b: int, t: int, c: int, width: int, hidden: int, shape: BlockShape) -> Saved:
    """The shapes of the saved tensors."""
    n = b * t
    return Saved(
        ln1=(n, c), mean1=(n,), rstd1=(n,), qkv=(n, width), att=(n, shape.heads * shape.head_dim),
        lse=(b, shape.heads, t), x1=(n, c), ln2=(n, c), mean2=(n,), rstd2=(n,),
        slope=(n, hidden), act=(n, hidden),
    )  # fmt: skip


def _threaded_forward(
    x: Tensor, params: list[Tensor | None], shape: BlockShape, seed: int
) -> tuple[Tensor, list[Tensor]]:
    b, t, c = x.shape
    p = Params(*params)
    sizes = _saved_sizes(b, t, c, p.qkv_w.shape[0], p.fc_w.shape[0], shape)
    saved = [x.new_empty(size) for size in sizes]
    y = torch.empty_like(x)
    status = native_library().lmarch_gpt_block_forward(
        x.data_ptr(), _pointers(params), _pointers(saved), y.data_ptr(),
        ctypes.byref(_c_shape(x, params, shape, seed)), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("lmarch_gpt_block_forward: out of memory")
    return y, saved


def _threaded_backward(
    grad: Tensor,
    x: Tensor,
    saved: list[Tensor],
    params: list[Tensor | None],
    shape: BlockShape,
    seed: int,
) -> tuple[Tensor, list[Tensor | None]]:
    grads = [None if p is None else torch.empty_like(p) for p in params]
    dx = torch.empty_like(x)
    status = native_library().lmarch_gpt_block_backward(
        grad.contiguous().data_ptr(), x.data_ptr(), _pointers(params), _pointers(saved),
        dx.data_ptr(), _pointers(grads), ctypes.byref(_c_shape(x, params, shape, seed)),
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("lmarch_gpt_block_backward: out of memory")
    return dx, grads


def block_forward(
    x: Tensor, params: list[Tensor | None], shape: BlockShape, seed: int = 0
) -> tuple[Tensor, list[Tensor]]:
    """(y [B, T, C], the tensors the backward needs besides x) for a contiguous float32 CPU x;
    ``seed`` draws the dropout masks when ``shape`` has dropout (the backward needs it too)."""
    if _threaded(x.shape[0]):
        return _threaded_forward(x, params, shape, seed)
    p = Params(*params)
    p_attn, p_mlp = shape.dropout_attn, shape.dropout_mlp
    seed_p, seed_attn, seed_mlp = _seeds(seed)
    b, t, c = x.shape
    x2 = x.reshape(b * t, c)
    ln1, mean1, rstd1 = _layer_norm(x2, p.ln1_w, p.ln1_b, shape.eps1)
    qkv = _linear(ln1, p.qkv_w, p.qkv_b)
    att, lse = attention_forward(qkv.view(b, t, -1), *shape[:3], p_attn, seed_p)
    att = att.view(b * t, -1)
    if p_attn > 0:
        x1 = _add_dropped(x2, _linear(att, p.out_w, p.out_b), p_attn, seed_attn)
    else:
        x1 = _plus_bias(x2, p.out_b).addmm_(att, p.out_w.t())
    ln2, mean2, rstd2 = _layer_norm(x1, p.ln2_w, p.ln2_b, shape.eps2)
    a, slope = _gelu_with_slope(_linear(ln2, p.fc_w, p.fc_b), shape.exact_gelu)
    if p_mlp > 0:
        y = _add_dropped(x1, _linear(a, p.pr_w, p.pr_b), p_mlp, seed_mlp)
    else:
        y = _plus_bias(x1, p.pr_b).addmm_(a, p.pr_w.t())
    saved = Saved(
        ln1=ln1, mean1=mean1, rstd1=rstd1, qkv=qkv, att=att, lse=lse, x1=x1, ln2=ln2,
        mean2=mean2, rstd2=rstd2, slope=slope, act=a,
    )  # fmt: skip
    return y.view(b, t, c), list(saved)


def block_backward(
    grad: Tensor,
    x: Tensor,
    saved: list[Tensor],
    params: list[Tensor | None],
    shape: BlockShape,
    seed: int = 0,
) -> tuple[Tensor, list[Tensor | None]]:
    """(dx [B, T, C], the parameters' gradients in the order of ``params``) from dy."""
    if _threaded(x.shape[0]):
        return _threaded_backward(grad, x.contiguous(), saved, params, shape, seed)
    p, s = Params(*params), Saved(*saved)
    p_attn, p_mlp = shape.dropout_attn, shape.dropout_mlp
    seed_p, seed_attn, seed_mlp = _seeds(seed)
    b, t, c = grad.shape
    x2 = x.contiguous().view(b * t, c)
    dy = grad.reshape(b * t, c).contiguous()
    # MLP: y = x1 + Dropout(a W_pr^T + b_pr), a = GELU(h), h = LN2(x1) W_fc^T + b_fc
    d_mlp = _add_dropped(None, dy, p_mlp, seed_mlp) if p_mlp > 0 else dy
    d_pr_b, d_pr_w = _bias_grad(d_mlp, p.pr_b), d_mlp.t() @ s.act
    dh = d_mlp @ p.pr_w
    d_fc_b = _bias_grad(dh, p.fc_b, scale=s.slope)  # dh = GELU'(h) * da, in place
    d_fc_w = dh.t() @ s.ln2
    dx1, d_ln2_w, d_ln2_b = _layer_norm_backward(
        dh @ p.fc_w, s.x1, s.mean2, s.rstd2, p.ln2_w, dy, p.ln2_b is not None
    )
    # attention: x1 = x + Dropout(att W_o^T + b_o), att = Attn(qkv), qkv = LN1(x) W_qkv^T + b_qkv
    d_attn = _add_dropped(None, dx1, p_attn, seed_attn) if p_attn > 0 else dx1
    d_out_b, d_out_w = _bias_grad(d_attn, p.out_b), d_attn.t() @ s.att
    d_att = (d_attn @ p.out_w).view(b, t, -1)
    dqkv = attention_backward(
        s.qkv.view(b, t, -1), s.att.view(b, t, -1), s.lse, d_att, *shape[:3], p_attn, seed_p
    ).view(b * t, -1)
    d_qkv_b, d_qkv_w = _bias_grad(dqkv, p.qkv_b), dqkv.t() @ s.ln1
    dx, d_ln1_w, d_ln1_b = _layer_norm_backward(
        dqkv @ p.qkv_w, x2, s.mean1, s.rstd1, p.ln1_w, dx1, p.ln1_b is not None
    )
    grads = Params(
        ln1_w=d_ln1_w, ln1_b=d_ln1_b, qkv_w=d_qkv_w, qkv_b=d_qkv_b, out_w=d_out_w,
        out_b=d_out_b, ln2_w=d_ln2_w, ln2_b=d_ln2_b, fc_w=d_fc_w, fc_b=d_fc_b, pr_w=d_pr_w,
        pr_b=d_pr_b,
    )  # fmt: skip
    return dx.view(b, t, c), list(grads)


def reference_block(
    x: Tensor, params: list[Tensor | None], shape: BlockShape, seed: int = 0
) -> Tensor:
    """The same block in PyTorch's operators (twice differentiable), with the dropout masks the
    kernels draw from ``seed`` when ``shape`` has dropout."""
    p = Params(*params)
    b, t, c = x.shape
    keep_probs = keep_attn = keep_mlp = None
    seed_p, seed_attn, seed_mlp = _seeds(seed)
    if shape.dropout_attn > 0:  # the masks, made visible by dropping tensors of ones
        ones = x.new_ones(b * shape.heads * t, t)
        keep_probs = _add_dropped(None, ones, shape.dropout_attn, seed_p).view(b, -1, t, t)
        keep_attn = _add_dropped(None, x.new_ones(b * t, c), shape.dropout_attn, seed_attn)
    if shape.dropout_mlp > 0:
        keep_mlp = _add_dropped(None, x.new_ones(b * t, c), shape.dropout_mlp, seed_mlp)
    h = F.layer_norm(x, (c,), p.ln1_w, p.ln1_b, shape.eps1)
    qkv = F.linear(h, p.qkv_w, p.qkv_b)
    att = reference_causal_attention(qkv, *shape[:3], keep_probs)
    branch = F.linear(att, p.out_w, p.out_b)
    x1 = x + (branch if keep_attn is None else branch * keep_attn.view(b, t, c))
    h = F.linear(F.layer_norm(x1, (c,), p.ln2_w, p.ln2_b, shape.eps2), p.fc_w, p.fc_b)
    a = F.gelu(h) if shape.exact_gelu else F.gelu(h, approximate="tanh")
    branch = F.linear(a, p.pr_w, p.pr_b)
    return x1 + (branch if keep_mlp is None else branch * keep_mlp.view(b, t, c))


class _GPTBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shape: BlockShape, seed: int, *params: Tensor | None) -> Tensor:  # type: ignore[override]
        y, saved = block_forward(x.contiguous(), list(params), shape, seed)
        ctx.save_for_backward(x, *saved, *params)  # x itself: a second backward needs its graph
        ctx.shape, ctx.seed = shape, seed
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        x, *tensors = ctx.saved_tensors
        saved, params = tensors[:-N_PARAMS], tensors[-N_PARAMS:]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            dx, *grads = _differentiable_backward(grad, x, params, ctx.shape, ctx.seed)
        else:
            dx, grads = block_backward(grad, x, saved, params, ctx.shape, ctx.seed)
        return (dx, None, None, *grads)


def _differentiable_backward(
    grad: Tensor, x: Tensor, params: list[Tensor | None], shape: BlockShape, seed: int
) -> list[Tensor | None]:
    """(dx, *parameter gradients) through :func:`reference_block` with ``create_graph=True``:
    the saved inputs keep their graphs, so these gradients can be differentiated again."""
    inputs = [x, *params]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    y = reference_block(x, params, shape, seed)
    found = torch.autograd.grad(
        y, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True
    )
    out: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, found, strict=True):
        out[i] = g
    return out


# The same two directions as PyTorch operators, so a compiled graph keeps the block as one call.
# Operator signatures take no optional tensors in lists: ``weights`` are the parameters that
# exist and ``present`` says which of the twelve they are.
def _expand(weights: list[Tensor], present: list[int]) -> list[Tensor | None]:
    it = iter(weights)
    return [next(it) if p else None for p in present]


def _shape(values: list[float]) -> BlockShape:
    heads, kv_heads, head_dim, eps1, eps2, p_attn, p_mlp, exact = values
    return BlockShape(
        int(heads), int(kv_heads), int(head_dim), eps1, eps2, p_attn, p_mlp, exact > 0
    )


# Registered with the low-level API: ``torch.library.custom_op`` checks every output against every
# input for aliasing on each call, ~0.5 ms for this operator's thirteen outputs.
_LIBRARY = torch.library.Library("lmarch", "FRAGMENT")
_LIBRARY.define(
    "gpt_block(Tensor x, Tensor[] weights, int[] present, float[] shape, Tensor seed)"
    " -> (Tensor, Tensor[])"
)
_LIBRARY.define(
    "gpt_block_backward(Tensor grad, Tensor x, Tensor[] saved, Tensor[] weights, int[] present,"
    " float[] shape, Tensor seed) -> (Tensor, Tensor[])"
)


def _forward_impl(
    x: Tensor, weights: list[Tensor], present: list[int], shape: list[float], seed: Tensor
) -> tuple[Tensor, list[Tensor]]:
    params = _expand(weights, present)
    return block_forward(x.contiguous(), params, _shape(shape), int(seed))


def _backward_impl(
    grad: Tensor,
    x: Tensor,
    saved: list[Tensor],
    weights: list[Tensor],
    present: list[int],
    shape: list[float],
    seed: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    params = _expand(weights, present)
    dx, grads = block_backward(grad, x, saved, params, _shape(shape), int(seed))
    return dx, [g for g in grads if g is not None]


_LIBRARY.impl("gpt_block", _forward_impl, "CPU")
_LIBRARY.impl("gpt_block_backward", _backward_impl, "CPU")


@torch.library.register_fake("lmarch::gpt_block")
def _(x, weights, present, shape, seed):  # type: ignore[no-untyped-def]
    b, t, c = x.shape
    p = Params(*_expand(weights, present))
    sizes = _saved_sizes(b, t, c, p.qkv_w.shape[0], p.fc_w.shape[0], _shape(shape))
    return x.new_empty(b, t, c), [x.new_empty(size) for size in sizes]


@torch.library.register_fake("lmarch::gpt_block_backward")
def _(grad, x, saved, weights, present, shape, seed):  # type: ignore[no-untyped-def]
    return torch.empty_like(grad), [torch.empty_like(w) for w in weights]


_gpt_block_op = torch.ops.lmarch.gpt_block.default
_gpt_block_backward_op = torch.ops.lmarch.gpt_block_backward.default


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weights, present, shape, seed = inputs
    ctx.save_for_backward(x, seed, *output[1], *weights)
    ctx.n_saved, ctx.present, ctx.block_shape = len(output[1]), present, shape


def _backward(ctx, grad, _grad_saved):  # type: ignore[no-untyped-def]
    x, seed, *tensors = ctx.saved_tensors
    saved, weights = tensors[: ctx.n_saved], tensors[ctx.n_saved :]
    dx, grads = _gpt_block_backward_op(grad, x, saved, weights, ctx.present, ctx.block_shape, seed)
    return dx, grads, None, None, None


torch.library.register_autograd("lmarch::gpt_block", _backward, setup_context=_setup)


def gpt_block(x: Tensor, params: list[Tensor | None], shape: BlockShape) -> Tensor:
    """The pre-LN GPT-2 block above for float32 CPU x [B, T, C] (see the module docstring):
    ``params`` in the order ln1 weight/bias, qkv, out, ln2, fc, proj (weight then bias, None for
    an absent bias); weights in ``nn.Linear``'s [out, in] layout. With dropout in ``shape`` the
    masks come from a seed drawn from PyTorch's generator (so runs repeat and resume)."""
    dropping = shape.dropout_attn > 0 or shape.dropout_mlp > 0
    if torch.compiler.is_compiling():
        weights = [p for p in params if p is not None]
        present = [int(p is not None) for p in params]
        seed = draw_seed() if dropping else torch.zeros((), dtype=torch.int64)
        return _gpt_block_op(x, weights, present, [float(v) for v in shape], seed)[0]
    return _GPTBlock.apply(x, shape, int(draw_seed()) if dropping else 0, *params)


def draw_seed() -> Tensor:
    """The dropout masks' seed for one block call, from PyTorch's default generator."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


class NativeGPTBlock(TransformerBlock):
    """A GPT-2 :class:`~lmarch.nn.block.TransformerBlock` (same parameters, same state dict)
    whose calls :func:`lmarch.native.policy.gpt_block_call` accepts run as :func:`gpt_block`,
    one native call each way; every other call runs the reference forward."""

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        qk_transform: QKTransform | None = None,
    ) -> Tensor:
        """x: [B, T, dim] -> [B, T, dim]; keyword arguments as :meth:`TransformerBlock.forward`."""
        if gpt_block_call(self, x, attention_mask, cache, qk_transform):
            return gpt_block(x, self.block_parameters(), self.block_shape())
        return super().forward(
            x,
            attention_mask=attention_mask,
            cache=cache,
            layer_index=layer_index,
            start=start,
            qk_transform=qk_transform,
        )

    def block_parameters(self) -> list[Tensor | None]:
        """The twelve parameters in the kernel's order (:data:`BLOCK_PARAMETERS`)."""
        return _block_parameters(self)

    def block_shape(self) -> BlockShape:
        """Heads, widths, eps and this call's dropout rates (0 outside training)."""
        attn, ffn = self.attn, self.ffn
        p_attn, p_mlp = (attn.dropout, ffn.dropout.p) if self.training else (0.0, 0.0)
        return BlockShape(
            attn.n_heads, attn.n_kv_heads, attn.head_dim, self.norm_attn.eps, self.norm_ffn.eps,
            p_attn, p_mlp, ffn.act is F.gelu,
        )  # fmt: skip


__all__ = [
    "BLOCK_PARAMETERS",
    "BlockShape",
    "NativeGPTBlock",
    "block_backward",
    "block_forward",
    "draw_seed",
    "gpt_block",
    "reference_block",
]
