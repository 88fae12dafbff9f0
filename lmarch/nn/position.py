"""Position encodings.

Learned (GPT-2, BERT): a trainable table P in R^{T_max x d}, added to token embeddings.
Sinusoidal (Vaswani et al. 2017, sec. 3.5):
    PE(pos, 2i) = sin(pos / 10000^(2i/d)),   PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
Rotary (RoFormer, Su et al. 2021): queries and keys are rotated by position-dependent angles so
their dot product depends only on relative position; see :class:`RotaryEmbedding`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LearnedPositionalEmbedding(nn.Embedding):
    """A learned table of ``max_positions`` position vectors, looked up by absolute position."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__(max_positions, dim)

    def forward(self, positions: Tensor) -> Tensor:  # noqa: D102 - see class docstring
        return super().forward(positions)


def sinusoidal_table(max_positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed [max_positions, dim] sinusoid table; even columns sin, odd columns cos."""
    positions = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions * inv_freq
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal encodings, stored as a non-persistent buffer (nothing to learn or save)."""

    def __init__(self, max_positions: int, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_positions, dim, base), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


# ---- rotary position embeddings ---------------------------------------------------------------


def rope_inverse_frequencies(
    rotary_dim: int, theta: float = 10000.0, scaling: dict | None = None
) -> Tensor:
    """Inverse frequencies omega_i = theta^(-2i / d_rot), i = 0 .. d_rot/2 - 1 (Su et al. 2021),
    optionally rescaled for longer contexts:

    - ``{"type": "linear", "factor": s}`` — position interpolation (Chen et al. 2023): omega / s.
    - ``{"type": "ntk", "factor": s}`` — NTK-aware: theta' = theta * s^(d/(d-2)) (bloc97, 2023).
    - ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}`` — Llama 3.1: long wavelengths divided by ``factor``,
      short ones kept, a smooth blend between.
    """
    kind = (scaling or {}).get("type", (scaling or {}).get("rope_type", "default"))
    if kind == "ntk":
        theta = theta * scaling["factor"] ** (rotary_dim / (rotary_dim - 2))
    # float32 throughout, as the reference implementations compute it, so angles agree bit for bit
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    elif kind not in ("default", "ntk"):
        raise ValueError(f"unknown RoPE scaling type {kind!r}")
    return inv_freq


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: multiplying by i in the pairing
    (x_j, x_{j + d/2}) that the Hugging Face LLaMA layout uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_j, x_{j+d/2}) of the first ``cos.shape[-1]`` dims by angle pos * omega_j:
    x' = x cos + rotate_half(x) sin. Dims beyond the rotary width pass through (partial RoPE)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021) for queries and keys.

    The angle table for every position up to ``max_positions`` is computed once; calling the
    module with (q, k, start) rotates both by the angles of positions start .. start+T-1, so the
    dot product q_m . k_n depends only on the offset m - n. It plugs into
    :class:`~lmarch.nn.attention.MultiHeadAttention` as its ``qk_transform``.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float = 10000.0,
        rotary_dim: int | None = None,
        scaling: dict | None = None,
    ) -> None:
        super().__init__()
        rotary_dim = rotary_dim or head_dim
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
        self.max_positions, self.theta, self.rotary_dim, self.scaling = (
            max_positions,
            theta,
            rotary_dim,
            scaling,
        )
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.register_buffer("sin_signed", torch.empty(0), persistent=False)
        self.tables_version = 0  # bumped by every reset_tables (kernels cache the tables)
        self.reset_tables()

    def reset_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables, e.g. after building the model on the meta device."""
        device = device if device is not None else self.cos.device
        self.tables_version += 1
        if torch.device(device).type == "meta":  # shapes only: the tables come later
            shape = (self.max_positions, self.rotary_dim)
            self.cos = torch.empty(shape, device="meta")
            self.sin = torch.empty(shape, device="meta")
            self.sin_signed = torch.empty(shape, device="meta")
            return
        with torch.device("cpu"):  # not the ambient default device (meta while loading)
            inv_freq = rope_inverse_frequencies(self.rotary_dim, self.theta, self.scaling)
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            angles = torch.outer(positions, inv_freq)
            angles = torch.cat((angles, angles), dim=-1)  # same angle for x_j and x_{j+d/2}
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)
        half = self.rotary_dim // 2
        self.sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)

    def forward(self, q: Tensor, k: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        t = q.shape[-2]
        full = self.rotary_dim == q.shape[-1]
        sin_table = self.sin_signed if full else self.sin
        if isinstance(start, Tensor):  # compiled decode step: position as a tensor
            index = start + torch.arange(t, device=q.device)
            cos, sin = self.cos.index_select(0, index), sin_table.index_select(0, index)
        else:
            cos, sin = self.cos.narrow(0, start, t), sin_table.narrow(0, start, t)
        if cos.dtype != q.dtype:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        if not full:
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # rotate_half(x) * sin == roll(x, d/2) * (sin with its first half negated): the same
        # products, in two operations instead of five (this runs twice per layer per token)
        half = self.rotary_dim // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin
