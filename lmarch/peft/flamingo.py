"""A Flamingo-style adapter (Alayrac et al. 2022): a frozen decoder-only LM learns to look at
images through new layers added from outside, its own weights untouched.

Two pieces (the paper's figure 3 and 4):

- :class:`PerceiverResampler` turns a variable number of image features X_f [B, N, d_v] into a
  fixed number R of visual tokens: learned latents Z [R, d_v] attend to the features (and to
  themselves), layer after layer,

      Z = Z + Attn(q = LN(Z), kv = [LN(X_f); LN(Z)]);  Z = Z + FFW(LN(Z))

- :class:`GatedCrossAttention`, inserted before each (or every k-th) frozen LM block, lets the
  text states y [B, T, d] attend to the visual tokens through tanh gates that start at 0:

      y = y + tanh(a_xattn) * XAttn(LN(y), Z);  y = y + tanh(a_ffw) * FFW(LN(y)),  a = 0 at init

  so at initialisation the adapted LM computes exactly what the frozen LM did (tanh(0) = 0, and
  x + 0 * f is x, bit for bit), and training opens the gates as the new layers learn.

:func:`add_flamingo` wraps the LM's blocks in place — any model whose ``blocks`` is a
``ModuleList`` of blocks called as ``block(x, ...)`` (lmarch's GPT and LLaMA) — the way
:func:`lmarch.peft.add_lora` swaps Linear layers in, without a line of the model's file changed.
The visual tokens reach the wrapped blocks through :meth:`FlamingoAdapter.attending`. Every text
token sees every visual token (one image per sequence; the paper's per-image masking of
interleaved sequences is not needed here), and the LM's KV cache keeps working: cross-attention
does not depend on the text's positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.nn import MLP, CrossAttention, LayerNorm


class PerceiverResampler(nn.Module):
    """Image features [B, N, dim] -> ``n_latents`` visual tokens [B, R, dim] (Alayrac et al.
    2022, sec. 2.1 and figure 4; time embeddings are left out: one image, no video)."""

    def __init__(
        self, dim: int, n_latents: int = 8, n_layer: int = 2, n_head: int = 4, ffn_mult: int = 4
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm_media": LayerNorm(dim),
                    "norm_latents": LayerNorm(dim),
                    "attn": CrossAttention(dim, n_head, bias=False),
                    "norm_ffn": LayerNorm(dim),
                    "ffn": MLP(dim, ffn_mult * dim, "gelu", bias=False),
                }
            )
            for _ in range(n_layer)
        )
        self.norm = LayerNorm(dim)

    def forward(self, features: Tensor) -> Tensor:
        """Z = resampled visual tokens [B, R, dim] of ``features`` [B, N, dim]."""
        z = self.latents.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer["norm_latents"](z)
            # the latents' keys and values join the media's (the paper's "concatenate")
            memory = torch.cat([layer["norm_media"](features), latents], dim=1)
            z = z + layer["attn"](latents, memory)
            z = z + layer["ffn"](layer["norm_ffn"](z))
        return self.norm(z)


class GatedCrossAttention(nn.Module):
    """The tanh-gated cross-attention + feed-forward layer (Alayrac et al. 2022, figure 4):
    text states [B, T, dim] attend to visual tokens [B, R, memory_dim]; gates start at 0."""

    def __init__(self, dim: int, memory_dim: int, n_head: int, ffn_mult: int = 4) -> None:
        super().__init__()
        self.norm_attn = LayerNorm(dim)
        self.attn = CrossAttention(dim, n_head, memory_dim=memory_dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.norm_ffn = LayerNorm(dim)
        self.ffn = MLP(dim, ffn_mult * dim, "gelu", bias=False)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, visual: Tensor) -> Tensor:
        """y = x + tanh(a_xattn) XAttn(LN(x), visual); y + tanh(a_ffw) FFW(LN(y))."""
        x = x + torch.tanh(self.attn_gate) * self.attn(self.norm_attn(x), visual)
        return x + torch.tanh(self.ffn_gate) * self.ffn(self.norm_ffn(x))


class _VisualSlot:
    """Where the wrapped blocks find the current visual tokens (None: the LM alone)."""

    def __init__(self) -> None:
        self.visual: Tensor | None = None


class GatedBlock(nn.Module):
    """A frozen LM block with a :class:`GatedCrossAttention` in front of it."""

    def __init__(self, block: nn.Module, xattn: GatedCrossAttention, slot: _VisualSlot) -> None:
        super().__init__()
        self.block = block
        self.xattn = xattn
        self._slot = slot

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """xattn(x, visual) when visual tokens are set, then the LM block as before."""
        if self._slot.visual is not None:
            x = self.xattn(x, self._slot.visual.to(x.dtype))
        return self.block(x, *args, **kwargs)


class FlamingoAdapter(nn.Module):
    """The trainable part: the resampler and the gated cross-attention layers (also reachable
    inside the LM's wrapped blocks). Its ``state_dict`` is the adapter to save."""

    def __init__(self, resampler: PerceiverResampler, layers: list[GatedCrossAttention]) -> None:
        super().__init__()
        self.resampler = resampler
        self.xattn = nn.ModuleList(layers)
        self._slot = _VisualSlot()

    @contextmanager
    def attending(self, features: Tensor | None) -> Iterator[Tensor | None]:
        """Within the block, the LM attends to the resampled ``features`` [B, N, d_v] (image
        tokens from a vision encoder); None: the LM alone. Yields the visual tokens."""
        visual = None if features is None else self.resampler(features)
        self._slot.visual = visual
        try:
            yield visual
        finally:
            self._slot.visual = None

    @torch.no_grad()
    def gates(self) -> list[tuple[float, float]]:
        """tanh of each layer's (cross-attention, feed-forward) gate: how open it is."""
        return [(float(torch.tanh(x.attn_gate)), float(torch.tanh(x.ffn_gate))) for x in self.xattn]


def add_flamingo(
    model: nn.Module,
    vision_dim: int,
    *,
    n_latents: int = 8,
    resampler_layers: int = 2,
    n_head: int = 4,
    every: int = 1,
    freeze: bool = True,
) -> FlamingoAdapter:
    """Freeze ``model`` (a decoder-only LM with a ``blocks`` ModuleList and ``config.n_embd``)
    and put a :class:`GatedCrossAttention` in front of every ``every``-th block, reading visual
    tokens of width ``vision_dim`` from a new :class:`PerceiverResampler`. Returns the adapter
    (the parameters to train); the model's own forward is unchanged in form."""
    blocks = getattr(model, "blocks", None)
    dim = getattr(getattr(model, "config", None), "n_embd", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(dim, int):
        raise LmarchError(
            f"{type(model).__name__} has no 'blocks' list and config.n_embd to adapt",
            hint="a decoder-only lmarch model (GPT, LLaMA)",
        )
    if any(isinstance(b, GatedBlock) for b in blocks):
        raise LmarchError("the model already has Flamingo layers")
    if every < 1 or dim % n_head or vision_dim % n_head:
        raise LmarchError(
            f"every must be >= 1 and n_head ({n_head}) must divide the widths ({dim}, {vision_dim})"
        )
    if freeze:
        model.requires_grad_(False)
    resampler = PerceiverResampler(vision_dim, n_latents, resampler_layers, n_head)
    layers: list[GatedCrossAttention] = []
    adapter = FlamingoAdapter(resampler, layers)
    for i in range(0, len(blocks), every):
        xattn = GatedCrossAttention(dim, vision_dim, n_head)
        layers.append(xattn)
        blocks[i] = GatedBlock(blocks[i], xattn, adapter._slot)
    adapter.xattn.extend(layers)
    ref = next(model.parameters())
    return adapter.to(device=ref.device, dtype=ref.dtype)


class FlamingoLM(nn.Module):
    """A frozen decoder LM with Flamingo layers (:func:`add_flamingo`) and the image tower
    whose patch states they read (Alayrac et al. 2022): one module, as a trained Flamingo
    run is loaded (:func:`lmarch.loading.vision.read_flamingo`).

    Args:
        lm: the decoder LM whose blocks :func:`add_flamingo` wrapped (lmarch's GPT).
        vision: the image encoder; its output's ``hidden`` [B, N, d_v] are the features.
        adapter: what :func:`add_flamingo` returned for ``lm``.
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, adapter: FlamingoAdapter) -> None:
        super().__init__()
        self.lm = lm
        self.vision = vision
        self.adapter = adapter

    @property
    def config(self) -> Any:
        """The LM's config (vocabulary, context): what text-side checks ask for."""
        return self.lm.config

    def forward(self, input_ids: Tensor, pixels: Tensor | None = None) -> Tensor:
        """LM logits [B, T, V] of ``input_ids``, attending to the image ``pixels`` [B, C, H, W]
        through the resampler's visual tokens (None: the frozen LM alone, gates unused)."""
        features = None if pixels is None else self.vision(pixels).hidden
        with self.adapter.attending(features):
            return self.lm(input_ids)


__all__ = [
    "FlamingoAdapter",
    "FlamingoLM",
    "GatedBlock",
    "GatedCrossAttention",
    "PerceiverResampler",
    "add_flamingo",
]
