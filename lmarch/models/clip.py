"""CLIP: contrastive language-image pre-training (Radford et al. 2021).

    I_f = ViT(image)[class token]            image tower (:mod:`lmarch.models.vit`, variant "clip")
    T_f = TextTransformer(text)[EOS]         causal pre-LN text tower, read at the EOS token
    I_e = normalize(I_f W_i);  T_e = normalize(T_f W_t)            projections to a joint space
    logits = exp(t) * I_e T_e^T                                     [n images, n texts]
    loss = (CE(logits, labels, axis=0) + CE(logits, labels, axis=1)) / 2

(Radford et al. 2021, figure 3.) ``t`` is a learned log-temperature (``logit_scale``,
initialised to log(1 / 0.07)); the paper clips exp(t) at 100 during training. A batch of n
matched pairs gives n positives on the diagonal and n^2 - n negatives; the symmetric
cross-entropy pulls each image towards its own caption and away from the others.

The text tower is GPT-2-like but reads one position: the state of the end-of-text token (the
highest id in OpenAI's vocabulary, so checkpoints whose ``eos_token_id`` is 2 — the value in
older configs — find it by argmax, and newer ones by the first occurrence of their EOS id, as
the Hugging Face implementation does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmarch.models.validate import (
    ConfigError,
    check_choice,
    check_fraction,
    check_int,
    check_positive,
)
from lmarch.models.vit import ViT, ViTConfig, encoder_block
from lmarch.nn import LayerNorm, LearnedPositionalEmbedding, padding_mask
from lmarch.nn.attention import ATTENTION_IMPLEMENTATIONS
from lmarch.nn.ffn import ACTIVATIONS


def clip_vision_config(**values: object) -> ViTConfig:
    """CLIP ViT-B/32's image tower (Radford et al. 2021, table 20): 224 pixels, 32-pixel
    patches, 12 layers of 768, quick GELU, LN eps 1e-5; ``values`` override fields."""
    base = dict(
        image_size=224,
        patch_size=32,
        n_layer=12,
        n_head=12,
        n_embd=768,
        intermediate_size=3072,
        activation="quick_gelu",
        layer_norm_eps=1e-5,
        variant="clip",
    )
    return ViTConfig(**{**base, **values})


@dataclass
class CLIPConfig:
    """CLIP hyper-parameters; defaults are ViT-B/32 (Radford et al. 2021, tables 19-20).

    The flat fields describe the text tower; ``vision`` the image tower (a
    :class:`~lmarch.models.vit.ViTConfig` of variant ``"clip"``, or its dict)."""

    vocab_size: int = 49408
    block_size: int = 77  # longest text, in tokens (rows of the position table)
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    intermediate_size: int = 2048
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    eos_token_id: int = 49407  # the token whose state is the text's vector (2: argmax of ids)
    pad_token_id: int = 1
    projection_dim: int = 512  # width of the joint image-text space
    logit_scale_init: float = math.log(1 / 0.07)  # the paper's initial temperature 0.07
    attention: str = "sdpa"
    vision: ViTConfig = field(default_factory=clip_vision_config)

    def __post_init__(self) -> None:
        owner = "CLIPConfig"
        if isinstance(self.vision, dict):  # read back from config_to_dict
            self.vision = ViTConfig(**self.vision)
        if not isinstance(self.vision, ViTConfig) or self.vision.variant != "clip":
            raise ConfigError(f"{owner}: vision must be a ViTConfig of variant 'clip'", "vision")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "intermediate_size", self.intermediate_size)
        check_int(owner, "projection_dim", self.projection_dim)
        check_int(owner, "eos_token_id", self.eos_token_id, low=0)
        check_int(owner, "pad_token_id", self.pad_token_id, low=0)
        check_choice(owner, "activation", self.activation, ACTIVATIONS)
        check_positive(owner, "layer_norm_eps", self.layer_norm_eps)
        check_fraction(owner, "dropout", self.dropout)
        check_choice(owner, "attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"{owner}: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
                field="n_embd",
            )


class TextOutput(NamedTuple):
    """``hidden``: [B, T, d] final-normalised token states; ``pooled``: [B, d], the EOS state."""

    hidden: Tensor
    pooled: Tensor


class CLIPOutput(NamedTuple):
    """The contrastive scores: ``logits_per_image`` [n images, n texts] (its transpose is
    ``logits_per_text``) and the unit-length embeddings they come from."""

    logits_per_image: Tensor
    logits_per_text: Tensor
    image_embeds: Tensor
    text_embeds: Tensor


def eos_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """Index of the token each text is read at: the first ``eos_token_id`` in each row, or the
    row's largest id when ``eos_token_id`` is 2 (older CLIP configs; see the module docstring)."""
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower: token + learned position embeddings, causal pre-LN blocks, a final
    LayerNorm, and the state at the EOS token as the text's vector."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.positions = LearnedPositionalEmbedding(c.block_size, c.n_embd)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            encoder_block(
                c.n_embd,
                c.n_head,
                c.intermediate_size,
                c.activation,
                c.layer_norm_eps,
                causal=True,
                dropout=c.dropout,
                attention=c.attention,
            )
            for _ in range(c.n_layer)
        )
        self.norm = LayerNorm(c.n_embd, c.layer_norm_eps)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> TextOutput:
        """ids [B, T] (``attention_mask`` [B, T]: 1 for real tokens) -> :class:`TextOutput`."""
        t = ids.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"text of {t} tokens is longer than block_size {self.config.block_size}"
            )
        pos = torch.arange(t, device=ids.device)
        x = self.dropout(self.tokens(ids) + self.positions(pos))
        mask = None if attention_mask is None else padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        x = self.norm(x)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return TextOutput(x, x[rows, eos_positions(ids, self.config.eos_token_id)])


class CLIP(nn.Module):
    """Image and text towers with projections into one space and a learned temperature."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = ViT(c.vision)
        self.text = CLIPTextTransformer(c)
        self.visual_projection = nn.Linear(c.vision.n_embd, c.projection_dim, bias=False)
        self.text_projection = nn.Linear(c.n_embd, c.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal weights with the widths' scales (std d^-0.5 for the projections and token
        table, 0.01 for positions), as OpenAI's CLIP code initialises them."""
        self.vision.reset_parameters()
        for module in self.text.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.n_embd**-0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.text.tokens.weight, std=0.02)
        nn.init.normal_(self.text.positions.weight, std=0.01)
        nn.init.normal_(self.visual_projection.weight, std=self.config.vision.n_embd**-0.5)
        nn.init.normal_(self.text_projection.weight, std=self.config.n_embd**-0.5)

    def image_features(self, pixels: Tensor) -> Tensor:
        """I_f W_i: [B, C, H, W] -> [B, projection_dim] (not normalised)."""
        return self.visual_projection(self.vision(pixels).pooled)

    def text_features(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """T_f W_t: [B, T] -> [B, projection_dim] (not normalised)."""
        return self.text_projection(self.text(ids, attention_mask).pooled)

    def forward(
        self, ids: Tensor, pixels: Tensor, attention_mask: Tensor | None = None
    ) -> CLIPOutput:
        """Scores of every image against every text: exp(t) * I_e T_e^T."""
        image = F.normalize(self.image_features(pixels), dim=-1)
        text = F.normalize(self.text_features(ids, attention_mask), dim=-1)
        logits_per_text = text @ image.t() * self.logit_scale.exp()
        return CLIPOutput(logits_per_text.t(), logits_per_text, image, text)


def contrastive_loss(logits_per_image: Tensor) -> Tensor:
    """The symmetric InfoNCE loss of matched pairs on the diagonal (Radford et al. 2021,
    figure 3): the mean of the cross-entropies over rows (image -> text) and columns."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)
    ) / 2


__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "CLIPTextTransformer",
    "TextOutput",
    "clip_vision_config",
    "contrastive_loss",
    "eos_positions",
]
