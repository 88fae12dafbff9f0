"""The residual block every Transformer family is built from.

Pre-LN (GPT-2, LLaMA; Xiong et al. 2020):   x = x + Attn(Norm(x));  x = x + FFN(Norm(x))
Post-LN (original Transformer, BERT):       x = Norm(x + Attn(x));  x = Norm(x + FFN(x))

The block does not know which attention, feed-forward or norm it holds: families choose them in
their config and pass them in, so pre-LN vs post-LN is a flag here, not a second class.
One combination has a fast path: a GPT-2 block (pre-LN, LayerNorm, GELU MLP, plain causal
self-attention) on float32 CPU tensors runs as one native call (:mod:`lmarch.native.gpt_block`),
the same function to ~1e-6 (its speed: benchmarks/RESULTS.md, "GPT training throughput").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.native.gpt_block import BlockShape, gpt_block
from lmarch.nn.attention import MultiHeadAttention, QKTransform
from lmarch.nn.cache import KVCache
from lmarch.nn.ffn import MLP, gelu_tanh
from lmarch.nn.norm import LayerNorm


class TransformerBlock(nn.Module):
    """One self-attention + feed-forward residual block (pre- or post-normalised)."""

    def __init__(
        self,
        attn: MultiHeadAttention,
        ffn: nn.Module,
        norm_attn: nn.Module,
        norm_ffn: nn.Module,
        pre_norm: bool = True,
    ) -> None:
        super().__init__()
        self.norm_attn = norm_attn
        self.attn = attn
        self.norm_ffn = norm_ffn
        self.ffn = ffn
        self.pre_norm = pre_norm

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
        """x: [B, T, dim] -> [B, T, dim]; keyword arguments are passed to the attention."""
        kw = dict(
            attention_mask=attention_mask,
            cache=cache,
            layer_index=layer_index,
            start=start,
            qk_transform=qk_transform,
        )
        if self._fused_gpt2(x, attention_mask, cache, qk_transform):
            return self._gpt2_block(x)
        if self.pre_norm:
            x = x + self.attn(self.norm_attn(x), **kw)
            return x + self.ffn(self.norm_ffn(x))
        x = self.norm_attn(x + self.attn(x, **kw))
        return self.norm_ffn(x + self.ffn(x))

    def _fused_gpt2(
        self,
        x: Tensor,
        attention_mask: Tensor | None,
        cache: KVCache | None,
        qk_transform: QKTransform | None,
    ) -> bool:
        """Whether this call is a GPT-2 block that runs as one native call
        (:mod:`lmarch.native.gpt_block`): pre-LN with LayerNorms, a GELU MLP (tanh or erf form),
        plain causal self-attention that lmarch's kernel takes (dropout included, one rate for
        its probabilities and its output), plain ``nn.Linear`` projections (not LoRA-wrapped or
        quantised) with float32 weights, float32 activations on the CPU, no autocast and no
        hooks on the parts (they would be skipped)."""
        ffn, attn = self.ffn, self.attn
        if not (
            self.pre_norm
            and type(self.norm_attn) is LayerNorm
            and type(self.norm_ffn) is LayerNorm
            and type(ffn) is MLP
            and (ffn.act is gelu_tanh or ffn.act is F.gelu)
            and attn.resid_dropout.p == attn.dropout
            and x.dim() == 3
            and not torch.is_autocast_enabled("cpu")
            and attn._native_causal(x, attention_mask, cache, qk_transform, allow_dropout=True)
        ):
            return False
        linears = (attn.qkv, attn.out, ffn.fc_in, ffn.fc_out)
        norms = (self.norm_attn, self.norm_ffn)
        if any(type(m) is not nn.Linear for m in linears):
            return False
        return all(m.weight.dtype == torch.float32 for m in linears + norms) and not any(
            m._forward_hooks or m._forward_pre_hooks for m in (attn, ffn, *linears, *norms)
        )

    def _gpt2_block(self, x: Tensor) -> Tensor:
        attn, ffn, n1, n2 = self.attn, self.ffn, self.norm_attn, self.norm_ffn
        params = [n1.weight, n1.bias, attn.qkv.weight, attn.qkv.bias, attn.out.weight]
        params += [attn.out.bias, n2.weight, n2.bias, ffn.fc_in.weight, ffn.fc_in.bias]
        params += [ffn.fc_out.weight, ffn.fc_out.bias]
        p_attn, p_mlp = (attn.dropout, ffn.dropout.p) if self.training else (0.0, 0.0)
        exact = ffn.act is F.gelu
        shape = BlockShape(
            attn.n_heads, attn.n_kv_heads, attn.head_dim, n1.eps, n2.eps, p_attn, p_mlp, exact
        )
        return gpt_block(x, params, shape)
