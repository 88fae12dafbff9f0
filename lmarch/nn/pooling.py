"""Pooling token states into one vector per sequence, for classification and sentence embeddings.

Given hidden states h_1..h_T and a 0/1 mask m_t of real tokens:

    cls:   e = h_1                                   (the [CLS] token; Devlin et al. 2019)
    mean:  e = sum_t m_t h_t / max(sum_t m_t, eps)   (Sentence-BERT's default; Reimers & Gurevych 2019)
    max:   e_j = max_{t: m_t = 1} h_{t,j}

and L2 normalisation e / ||e||_2 puts embeddings on the unit sphere, so a dot product is a cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

POOLING_MODES = ("cls", "mean", "max")


def pool(hidden: Tensor, attention_mask: Tensor | None = None, mode: str = "mean") -> Tensor:
    """[B, T, H] hidden states -> [B, H] sequence vectors; pad positions (mask 0) are left out."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {POOLING_MODES}")
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1) if mode == "mean" else hidden.amax(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        # the clamp keeps an all-pad row at zero instead of 0/0
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(||x||_2, eps) along the last dim."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


__all__ = ["POOLING_MODES", "l2_normalize", "pool"]
