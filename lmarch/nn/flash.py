"""Flash attention written out: tiled attention with an online softmax, in torch operations.

Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
(Algorithm 1 forward, Algorithm 2 backward) and Dao 2023, "FlashAttention-2" (the form of the
backward used here: one pass over key blocks, recomputing the probabilities from the saved
log-sum-exp). Nothing of size T x S is ever stored: the forward keeps per query row a running
maximum m, a running normaliser l and an unnormalised output; the backward recomputes each
block's probabilities. Memory is O(T·D + block_q·block_k) per head; the point is teaching and
memory, not speed (the tiles are ordinary torch matmuls driven by Python loops).

Forward, for a query block Q_i and each key block (K_j, V_j), with S_ij = scale · Q_i K_j^T:

    m_new = max(m, rowmax(S_ij))
    l_new = e^{m - m_new} · l + rowsum(e^{S_ij - m_new})
    O_new = e^{m - m_new} · O + e^{S_ij - m_new} V_j        (O kept unnormalised)

and at the end O_i = O / l, L_i = m + log l (the log-sum-exp, saved for the backward).

Backward, with P_ij = e^{S_ij - L_i} recomputed block by block:

    D_i  = rowsum(dO_i ∘ O_i)
    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij ∘ (dP_ij - D_i)
    dQ_i += scale · dS_ij K_j
    dK_j += scale · dS_ij^T Q_i
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmarch.nn.attention import attention_scale

_NEG_INF = float("-inf")


def _allowed(
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    offset: int,
    causal: bool,
    pad: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Boolean block mask (True = may attend) broadcasting against [B, H_kv, G, bq, bk], or None.

    Causal is bottom-right aligned: query t sees keys 0 .. t + offset with offset = S - T, as
    :func:`lmarch.nn.attention.causal_mask` does.
    """
    mask = None
    if causal:
        q_pos = torch.arange(q0, q1, device=device) + offset
        k_pos = torch.arange(k0, k1, device=device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [bq, bk]
    if pad is not None:
        block = pad[:, None, None, None, k0:k1]  # [B, 1, 1, 1, bk]
        mask = block if mask is None else mask & block
    return mask


def _key_blocks(q0: int, q1: int, s: int, block_k: int, offset: int, causal: bool) -> range:
    """Key block starts that a query block [q0, q1) can see (causal skips the blocks above the
    diagonal entirely)."""
    end = min(s, q1 - 1 + offset + 1) if causal else s
    return range(0, max(end, 0), block_k)


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled exact attention (forward Algorithm 1, backward FlashAttention-2) as an autograd
    Function; see the module docstring for the recurrences. Inputs: q [B,H,T,D], k/v
    [B,H_kv,S,D] with H a multiple of H_kv, a boolean [B, S] padding mask or None."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pad: Tensor | None,
        causal: bool,
        scale: float,
        block_q: int,
        block_k: int,
    ) -> Tensor:
        b, h, t, d = q.shape
        h_kv, s = k.shape[1], k.shape[2]
        g = h // h_kv
        offset = s - t
        work = torch.promote_types(q.dtype, torch.float32)  # accumulate half inputs in fp32
        # grouped-query heads share a key/value head: query head h uses kv head h // g, so a view
        # [B, H_kv, G, T, D] lets one matmul against K [B, H_kv, S, D] serve the whole group
        q5 = q.reshape(b, h_kv, g, t, d)
        out = torch.empty(b, h_kv, g, t, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h_kv, g, t, dtype=work, device=q.device)
        for q0 in range(0, t, block_q):
            q1 = min(q0 + block_q, t)
            bq = q1 - q0
            qi = q5[:, :, :, q0:q1].reshape(b, h_kv, g * bq, d).to(work)
            m = torch.full((b, h_kv, g, bq), _NEG_INF, dtype=work, device=q.device)
            l_run = torch.zeros(b, h_kv, g, bq, dtype=work, device=q.device)
            acc = torch.zeros(b, h_kv, g * bq, d, dtype=work, device=q.device)
            for k0 in _key_blocks(q0, q1, s, block_k, offset, causal):
                k1 = min(k0 + block_k, s)
                kj, vj = k[:, :, k0:k1].to(work), v[:, :, k0:k1].to(work)
                sij = (qi @ kj.transpose(-2, -1) * scale).view(b, h_kv, g, bq, k1 - k0)
                mask = _allowed(q0, q1, k0, k1, offset, causal, pad, q.device)
                if mask is not None:
                    sij = sij.masked_fill(~mask, _NEG_INF)
                m_new = torch.maximum(m, sij.amax(-1))
                # a row that has seen no key yet keeps m = -inf; subtract 0 there to avoid nan
                m_safe = torch.where(m_new == _NEG_INF, 0.0, m_new)
                p = torch.exp(sij - m_safe[..., None])
                alpha = torch.exp(m - m_safe)
                l_run = alpha * l_run + p.sum(-1)
                acc = alpha.reshape(b, h_kv, g * bq, 1) * acc + p.reshape(b, h_kv, g * bq, -1) @ vj
                m = m_new
            seen = l_run > 0
            # a row that sees no key gives zeros, and +inf log-sum-exp makes its P zero later
            denom = torch.where(seen, l_run, 1.0).reshape(b, h_kv, g * bq, 1)
            out[:, :, :, q0:q1] = (acc / denom).view(b, h_kv, g, bq, d).to(q.dtype)
            m_safe = torch.where(seen, m, 0.0)
            lse[:, :, :, q0:q1] = torch.where(seen, m_safe + torch.log(l_run), float("inf"))
        out = out.view(b, h, t, d)
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.config = (causal, scale, block_q, block_k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, out, lse, pad = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.config
        b, h, t, d = q.shape
        h_kv, s = k.shape[1], k.shape[2]
        g = h // h_kv
        offset = s - t
        work = lse.dtype
        q5 = q.reshape(b, h_kv, g, t, d)
        do5 = grad_out.reshape(b, h_kv, g, t, d)
        # D_i = rowsum(dO ∘ O): [B, H_kv, G, T], O(T) per head
        delta = (grad_out.to(work) * out.to(work)).sum(-1).view(b, h_kv, g, t)
        dq = torch.zeros(b, h_kv, g, t, d, dtype=work, device=q.device)
        dk = torch.zeros(b, h_kv, s, d, dtype=work, device=q.device)
        dv = torch.zeros(b, h_kv, s, d, dtype=work, device=q.device)
        for q0 in range(0, t, block_q):
            q1 = min(q0 + block_q, t)
            bq = q1 - q0
            qi = q5[:, :, :, q0:q1].reshape(b, h_kv, g * bq, d).to(work)
            doi = do5[:, :, :, q0:q1].reshape(b, h_kv, g * bq, d).to(work)
            lse_i = lse[:, :, :, q0:q1, None]
            delta_i = delta[:, :, :, q0:q1, None]
            dqi = torch.zeros(b, h_kv, g * bq, d, dtype=work, device=q.device)
            for k0 in _key_blocks(q0, q1, s, block_k, offset, causal):
                k1 = min(k0 + block_k, s)
                bk = k1 - k0
                kj, vj = k[:, :, k0:k1].to(work), v[:, :, k0:k1].to(work)
                sij = (qi @ kj.transpose(-2, -1) * scale).view(b, h_kv, g, bq, bk)
                mask = _allowed(q0, q1, k0, k1, offset, causal, pad, q.device)
                if mask is not None:
                    sij = sij.masked_fill(~mask, _NEG_INF)
                p = torch.exp(sij - lse_i)  # P_ij recomputed from the log-sum-exp
                dp = (doi @ vj.transpose(-2, -1)).view(b, h_kv, g, bq, bk)
                ds = (p * (dp - delta_i)).reshape(b, h_kv, g * bq, bk)
                p = p.reshape(b, h_kv, g * bq, bk)
                # the transposed products sum over the G query heads sharing this kv head
                dv[:, :, k0:k1] += p.transpose(-2, -1) @ doi
                dk[:, :, k0:k1] += scale * (ds.transpose(-2, -1) @ qi)
                dqi += scale * (ds @ kj)
            dq[:, :, :, q0:q1] = dqi.view(b, h_kv, g, bq, d)
        dq = dq.view(b, h, t, d).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> Tensor:
    """Exact attention softmax(scale · q k^T, masked) v computed in tiles (FlashAttention).

    ``q`` is [B, H, T, D]; ``k`` and ``v`` are [B, H_kv, S, D] with H a multiple of H_kv
    (grouped-query heads share key/value heads without copies). ``causal`` is bottom-right
    aligned when T != S (the T queries are the last T positions). ``key_padding_mask`` is boolean
    [B, S], True where a key may be attended; a query that may see no key gets zeros. ``scale``
    defaults to 1 / sqrt(D). Memory is O(T·D + block_q·block_k) per head: no T x S matrix is
    formed or saved for the backward.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention expects q, k, v of shape [B, H, T, D]")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}"
        )
    if h % k.shape[1] != 0:
        raise ValueError(f"{h} query heads are not a multiple of {k.shape[1]} key/value heads")
    if block_q < 1 or block_k < 1:
        raise ValueError("block sizes must be positive")
    pad = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, k.shape[2]):
            raise ValueError(f"key_padding_mask must be [B, S] = {(b, k.shape[2])}")
        pad = key_padding_mask.to(device=q.device, dtype=torch.bool)
    scale = attention_scale(d, scale)
    return FlashAttentionFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), pad, causal, scale, block_q, block_k
    )
