"""The Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

    x_p = patches of the image, P x P each, flattened               N = HW / P^2 patches
    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos                    E: a strided convolution
    z_l = z_{l-1} + MSA(LN(z_{l-1}));  z_l = z_l + MLP(LN(z_l))       pre-LN blocks (eq. 2-3)
    y   = LN(z_L^0)                                                   the class token's state

An image is cut into non-overlapping P x P patches; each becomes a token through one linear map,
which is a convolution with kernel and stride P. A learned class token is prepended, learned
positions are added and a stack of bidirectional pre-LN blocks runs over the N + 1 tokens.

The position table is learned for one grid (image_size / patch_size squared). Another image size
gives another grid: the table's patch rows are resampled to it by bicubic interpolation
(sec. 3.2 of the paper, "2D interpolation of the pre-trained position embeddings").

Two variants, a config field apart (``variant``):

- ``"vit"`` (Hugging Face ``ViTModel``): a bias on the patch convolution, a final LayerNorm over
  every token, and an optional tanh pooler on the class token.
- ``"clip"`` (CLIP's image tower, Radford et al. 2021): no patch bias, a LayerNorm on the
  embeddings before the first block ("pre_layrnorm"), and the final LayerNorm applied to the
  class token only (the tokens' states are returned un-normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.models.validate import (
    ConfigError,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_positive,
)
from lmarch.nn import MLP, LayerNorm, LearnedPositionalEmbedding, MultiHeadAttention
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.block import TransformerBlock
from lmarch.nn.ffn import ACTIVATIONS

VIT_VARIANTS = ("vit", "clip")


@dataclass
class ViTConfig:
    """Vision Transformer hyper-parameters; defaults are ViT-B/16 at 224 pixels (86M,
    Dosovitskiy et al. 2021, table 1)."""

    image_size: int = 224  # side of the square image the position table was learned for
    patch_size: int = 16
    n_channels: int = 3
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    qkv_bias: bool = True
    variant: str = "vit"  # "vit" (HF ViTModel) or "clip" (CLIP's image tower)
    add_pooler: bool = False  # the tanh pooler on the class token ("vit" only)
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        owner = "ViTConfig"
        for name in ("image_size", "patch_size", "n_channels", "n_layer", "n_head", "n_embd"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "intermediate_size", self.intermediate_size)
        check_choice(owner, "activation", self.activation, ACTIVATIONS)
        check_positive(owner, "layer_norm_eps", self.layer_norm_eps)
        check_fraction(owner, "dropout", self.dropout)
        check_bool(owner, "qkv_bias", self.qkv_bias)
        check_bool(owner, "add_pooler", self.add_pooler)
        check_choice(owner, "variant", self.variant, VIT_VARIANTS)
        check_choice(owner, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"{owner}: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
                field="n_embd",
            )
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"{owner}: patch_size ({self.patch_size}) is larger than image_size "
                f"({self.image_size})",
                field="patch_size",
            )
        if self.add_pooler and self.variant != "vit":
            raise ConfigError(f"{owner}: add_pooler is for variant 'vit'", field="add_pooler")

    @property
    def grid(self) -> int:
        """Patches per side of the image the position table was learned for."""
        return self.image_size // self.patch_size


class VisionOutput(NamedTuple):
    """``hidden``: [B, 1 + N, d] token states (class token first); ``pooled``: [B, d], the
    image's vector (CLIP: LN of the class token; ViT: the tanh pooler, else the class state)."""

    hidden: Tensor
    pooled: Tensor


def encoder_block(
    dim: int,
    n_head: int,
    hidden: int,
    activation: str,
    eps: float,
    *,
    causal: bool,
    qkv_bias: bool = True,
    dropout: float = 0.0,
    attention: str = "sdpa",
) -> TransformerBlock:
    """One pre-LN block (LN, attention, residual; LN, MLP, residual) as ViT and CLIP use it."""
    attn = MultiHeadAttention(
        dim,
        n_head,
        bias=qkv_bias,
        out_bias=True,
        dropout=dropout,
        causal=causal,
        implementation=attention,
    )
    ffn = MLP(dim, hidden, activation=activation, dropout=dropout)
    return TransformerBlock(attn, ffn, LayerNorm(dim, eps), LayerNorm(dim, eps), pre_norm=True)


def interpolate_positions(table: Tensor, grid: int, rows: int, cols: int) -> Tensor:
    """A [1 + grid^2, d] position table (class row first) resampled to a rows x cols patch grid
    by bicubic interpolation (Dosovitskiy et al. 2021, sec. 3.2): [1 + rows * cols, d]."""
    if rows == grid and cols == grid:
        return table
    d = table.shape[-1]
    patches = table[1:].reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(rows * cols, d)], dim=0)


class ViT(nn.Module):
    """The Vision Transformer: pixels [B, C, H, W] -> :class:`VisionOutput`.

    An image whose size differs from ``config.image_size`` gets the position table resampled
    to its patch grid (:func:`interpolate_positions`); sides that are not a multiple of the
    patch size lose their last partial patch, as the strided convolution does.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = c = config
        clip = c.variant == "clip"
        self.patch_embed = nn.Conv2d(
            c.n_channels, c.n_embd, c.patch_size, stride=c.patch_size, bias=not clip
        )
        self.class_token = nn.Parameter(torch.zeros(c.n_embd))
        self.positions = LearnedPositionalEmbedding(c.grid * c.grid + 1, c.n_embd)
        self.embed_norm = LayerNorm(c.n_embd, c.layer_norm_eps) if clip else None
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            encoder_block(
                c.n_embd,
                c.n_head,
                c.intermediate_size,
                c.activation,
                c.layer_norm_eps,
                causal=False,
                qkv_bias=c.qkv_bias,
                dropout=c.dropout,
                attention=c.attention,
            )
            for _ in range(c.n_layer)
        )
        self.norm = LayerNorm(c.n_embd, c.layer_norm_eps)
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if c.add_pooler else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal weights (std 0.02) as ViT's reference code, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.class_token, std=0.02)

    def embed(self, pixels: Tensor) -> Tensor:
        """z_0: [B, C, H, W] -> [B, 1 + N, d], class token first, positions added."""
        if pixels.dim() != 4 or pixels.shape[1] != self.config.n_channels:
            raise ValueError(
                f"expected pixels [B, {self.config.n_channels}, H, W], got {tuple(pixels.shape)}"
            )
        patches = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        rows, cols = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_token.expand(patches.shape[0], 1, -1)
        table = interpolate_positions(self.positions.weight, self.config.grid, rows, cols)
        return torch.cat([cls, patches], dim=1) + table

    def forward(self, pixels: Tensor) -> VisionOutput:
        """Token states and the pooled image vector (see :class:`VisionOutput`)."""
        x = self.dropout(self.embed(pixels))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.config.variant == "clip":
            return VisionOutput(x, self.norm(x[:, 0]))
        x = self.norm(x)
        pooled = x[:, 0] if self.pooler is None else torch.tanh(self.pooler(x[:, 0]))
        return VisionOutput(x, pooled)


__all__ = [
    "VIT_VARIANTS",
    "ViT",
    "ViTConfig",
    "VisionOutput",
    "encoder_block",
    "interpolate_positions",
]
