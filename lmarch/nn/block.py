"""The residual block every Transformer family is built from.

Pre-LN (GPT-2, LLaMA; Xiong et al. 2020):   x = x + Attn(Norm(x));  x = x + FFN(Norm(x))
Post-LN (original Transformer, BERT):       x = Norm(x + Attn(x));  x = Norm(x + FFN(x))
Sandwich (Gemma 2/3; pre-LN with norms on the outputs too):
                                            x = x + Norm'(Attn(Norm(x)));  x = x + Norm'(FFN(Norm(x)))

The block does not know which attention, feed-forward or norm it holds: families choose them in
their config and pass them in, so pre-LN vs post-LN is a flag here, not a second class.

This is the reference. Fast versions of some blocks (a GPT-2 block as one native call, a
quantised LLaMA layer decoding one token as one call) are subclasses swapped in from outside by
:func:`lmarch.native.accelerate`, holding the same parameters under the same names; they fall
back to this forward for every call their kernels do not take.
"""

from __future__ import annotations

from torch import Tensor, nn

from lmarch.nn.attention import MultiHeadAttention, QKTransform
from lmarch.nn.cache import KVCache


class TransformerBlock(nn.Module):
    """One self-attention + feed-forward residual block (pre- or post-normalised; with
    ``post_norm_attn`` / ``post_norm_ffn``, pre-normalised with each sublayer's output
    normalised too before the residual add)."""

    def __init__(
        self,
        attn: MultiHeadAttention,
        ffn: nn.Module,
        norm_attn: nn.Module,
        norm_ffn: nn.Module,
        pre_norm: bool = True,
        post_norm_attn: nn.Module | None = None,
        post_norm_ffn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (post_norm_attn is not None or post_norm_ffn is not None) and not pre_norm:
            raise ValueError("norms on the sublayer outputs (sandwich) need pre_norm=True")
        self.norm_attn = norm_attn
        self.attn = attn
        self.norm_ffn = norm_ffn
        self.ffn = ffn
        self.pre_norm = pre_norm
        # the sandwich's output norms, registered only when given (a plain block's state dict
        # is unchanged)
        self.post_norm_attn = post_norm_attn
        self.post_norm_ffn = post_norm_ffn

    def forward(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        start: int | Tensor = 0,
        qk_transform: QKTransform | None = None,
        position_bias: Tensor | None = None,
    ) -> Tensor:
        """x: [B, T, dim] -> [B, T, dim]; keyword arguments are passed to the attention
        (``position_bias``: an additive score bias such as T5's, only when given)."""
        kw = dict(
            attention_mask=attention_mask,
            cache=cache,
            layer_index=layer_index,
            start=start,
            qk_transform=qk_transform,
        )
        if position_bias is not None:
            kw["position_bias"] = position_bias
        if self.pre_norm:
            if self.post_norm_attn is None and self.post_norm_ffn is None:
                x = x + self.attn(self.norm_attn(x), **kw)
                return x + self.ffn(self.norm_ffn(x))
            return self._sandwich(x, kw)
        x = self.norm_attn(x + self.attn(x, **kw))
        return self.norm_ffn(x + self.ffn(x))

    def _sandwich(self, x: Tensor, kw: dict) -> Tensor:
        a = self.attn(self.norm_attn(x), **kw)
        x = x + (a if self.post_norm_attn is None else self.post_norm_attn(a))
        f = self.ffn(self.norm_ffn(x))
        return x + (f if self.post_norm_ffn is None else self.post_norm_ffn(f))
