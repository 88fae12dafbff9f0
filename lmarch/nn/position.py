"""Position encodings.

Learned (GPT-2, BERT): a trainable table P in R^{T_max x d}, added to token embeddings.
Sinusoidal (Vaswani et al. 2017, sec. 3.5):
    PE(pos, 2i) = sin(pos / 10000^(2i/d)),   PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
(Marian and fairseq keep the same values in two halves instead: all sines, then all cosines.)
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


SINUSOID_LAYOUTS = ("interleaved", "halves")


def sinusoidal_table(
    max_positions: int, dim: int, base: float = 10000.0, layout: str = "interleaved"
) -> Tensor:
    """The fixed [max_positions, dim] sinusoid table (float32, angles computed in float64).

    ``layout="interleaved"`` (the paper's): even columns sin, odd columns cos.
    ``layout="halves"`` (Marian, fairseq): columns 0 .. ceil(d/2)-1 hold the sines and the rest
    the cosines of the same angles pos / base^(2i/d).
    """
    if layout not in SINUSOID_LAYOUTS:
        raise ValueError(f"unknown sinusoid layout {layout!r}; one of {list(SINUSOID_LAYOUTS)}")
    positions = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions * inv_freq
    sin, cos = torch.sin(angles), torch.cos(angles[:, : dim // 2])
    if layout == "halves":
        return torch.cat((sin, cos), dim=1).float()
    table = torch.zeros(max_positions, dim, dtype=torch.float64)
    table[:, 0::2] = sin
    table[:, 1::2] = cos
    return table.float()


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal encodings, stored as a non-persistent buffer (nothing to learn or save)."""

    def __init__(
        self, max_positions: int, dim: int, base: float = 10000.0, layout: str = "interleaved"
    ) -> None:
        super().__init__()
        self.max_positions, self.dim, self.base, self.layout = max_positions, dim, base, layout
        table = sinusoidal_table(max_positions, dim, base, layout)
        self.register_buffer("table", table, persistent=False)

    def reset_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the table, e.g. after building the model on the meta device."""
        device = device if device is not None else self.table.device
        if torch.device(device).type == "meta":
            self.table = torch.empty(self.max_positions, self.dim, device="meta")
            return
        with torch.device("cpu"):  # not the ambient default device (meta while loading)
            table = sinusoidal_table(self.max_positions, self.dim, self.base, self.layout)
        self.table = table.to(device)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


# ---- rotary position embeddings ---------------------------------------------------------------

# The most positions a rotary table is built for (16M; the longest real contexts are ~10M): the
# tables hold every position of the context, so a larger claim is an absurd allocation.
MAX_ROTARY_POSITIONS = 1 << 24

# The RoPE scalings this module implements, with the keys each one reads (beside "type").
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "factors": ("factors",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}
# Keys a scaling may lack: the others of ROPE_SCALING_KEYS are required.
_OPTIONAL_KEYS = {
    "dynamic": ("original_max_position_embeddings",),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


# YaRN keys that transformers reads as "absent" when 0 (``beta_fast or 32``, ``if mscale``)
_ZERO_MEANS_DEFAULT = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def rope_scaling_type(scaling: dict | None) -> str:
    """The scaling's kind: its ``type`` (or ``rope_type``) key, ``default`` when there is none."""
    scaling = scaling or {}
    return scaling.get("type", scaling.get("rope_type", "default"))


def check_rope_scaling(scaling: dict, rotary_dim: int, where: str = "rope_scaling") -> None:
    """Raise ``ValueError`` naming the key when ``scaling`` is not one this module implements
    (unknown type, missing or non-numeric parameter, unknown key)."""
    if not isinstance(scaling, dict):
        raise ValueError(f"{where} must be a dict, got {scaling!r}")
    kind = rope_scaling_type(scaling)
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"{where}: RoPE scaling type {kind!r} is not supported; one of {sorted(ROPE_SCALING_KEYS)}"
        )
    allowed = set(ROPE_SCALING_KEYS[kind]) | {"type", "rope_type"}
    unknown = sorted(set(scaling) - allowed)
    if unknown:
        raise ValueError(f"{where}: key {unknown[0]!r} is not used by RoPE scaling {kind!r}")
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if value is None and key in _OPTIONAL_KEYS.get(kind, ()):
            continue
        if value == 0 and key in _ZERO_MEANS_DEFAULT and not isinstance(value, bool):
            continue
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: truncate must be true or false, got {value!r}")
            continue
        if key == "factors":
            _check_factors(value, rotary_dim, where)
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0 < value < float("inf"):
            raise ValueError(f"{where}: {key} must be a number > 0, got {value!r}")
    if kind in ("ntk", "dynamic") and rotary_dim <= 2:
        raise ValueError(f"{where}: {kind} scaling needs a rotary width > 2, got {rotary_dim}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor must exceed low_freq_factor")


def _check_factors(factors: object, rotary_dim: int, where: str) -> None:
    """Per-frequency divisors: one number > 0 per rotated pair."""
    if not isinstance(factors, (list, tuple)) or len(factors) != rotary_dim // 2:
        size = len(factors) if isinstance(factors, (list, tuple)) else type(factors).__name__
        raise ValueError(f"{where}: factors must be {rotary_dim // 2} numbers, got {size}")
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < float("inf"):
            raise ValueError(f"{where}: factors must be numbers > 0, got {f!r}")


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (Peng et al. 2023, eq. 21): 0.1 * mscale * ln(s) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor by which a scaling multiplies cos and sin (so q.k by its square): YaRN's
    ``attention_factor``, by default 0.1 ln(s) + 1 (or the ratio of the ``mscale`` and
    ``mscale_all_dim`` temperatures when both are given, as DeepSeek's configs do); 1 otherwise."""
    if rope_scaling_type(scaling) != "yarn":
        return 1.0
    assert scaling is not None
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all = (scaling.get(k) for k in ("factor", "mscale", "mscale_all_dim"))
    if mscale and mscale_all:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    return _yarn_mscale(factor)


def _yarn_inverse_frequencies(rotary_dim: int, theta: float, scaling: dict) -> Tensor:
    """YaRN (Peng et al. 2023, "by parts"): dims that turn fewer than ``beta_slow`` times over
    the original context are interpolated (omega / s), dims that turn more than ``beta_fast``
    times keep omega, and a linear ramp over the dims between blends the two."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def dim_of(turns: float) -> float:  # the dim index that turns `turns` times over old_len
        return rotary_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    powers = theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    keep = 1 - ramp  # 1: extrapolate (keep omega), 0: interpolate (omega / s)
    return (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep


def dynamic_ntk_inverse_frequencies(
    rotary_dim: int, theta: float, factor: float, old_len: int, seq_len: int | Tensor
) -> Tensor:
    """Dynamic NTK scaling (emozilla, 2023): for a sequence of ``seq_len`` > ``old_len``
    positions, the base grows to theta * (s L / L_old - (s - 1))^(d / (d - 2)); up to
    ``old_len`` it is theta (plain RoPE). Computed in float32 with ``seq_len`` a tensor, as
    transformers computes it while running, so the frequencies agree to the last bit."""
    length = torch.as_tensor(seq_len).clamp(min=old_len)
    base = theta * ((factor * length / old_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, device=length.device).float() / rotary_dim)
    )


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
    - ``{"type": "yarn", "factor", "original_max_position_embeddings", ...}`` — YaRN's
      frequencies (its attention factor: :func:`rope_attention_factor`).
    - ``{"type": "factors", "factors": [f_0, ...]}`` — omega_i / f_i, one divisor per pair, as
      llama.cpp applies a file's ``rope_freqs`` tensor (how Llama 3.1 GGUFs store their scaling).
    - ``{"type": "dynamic", ...}`` depends on the sequence length: the frequencies here are the
      ones used up to the original length (plain RoPE); see :class:`DynamicNTKRotaryEmbedding`.
    """
    kind = rope_scaling_type(scaling)
    if kind == "ntk":
        theta = theta * scaling["factor"] ** (rotary_dim / (rotary_dim - 2))
    if kind == "yarn":
        return _yarn_inverse_frequencies(rotary_dim, theta, scaling)
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
    elif kind == "factors":  # llama.cpp's rope_freqs tensor: omega_i / f_i
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    elif kind not in ("default", "ntk", "dynamic"):
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


def _rotate(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, sin_signed: bool
) -> tuple[Tensor, Tensor]:
    """q, k rotated by the angles whose cos / sin rows are given (``sin_signed``: the sin rows
    have their first half negated and cover the whole head)."""
    if cos.dtype != q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if not sin_signed:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # rotate_half(x) * sin == roll(x, d/2) * (sin with its first half negated): the same
    # products, in two operations instead of five (this runs twice per layer per token)
    half = cos.shape[-1] // 2
    return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin


def _angle_tables(
    inv_freq: Tensor, positions: Tensor, attention_factor: float
) -> tuple[Tensor, Tensor]:
    """cos and sin [len(positions), 2 * len(inv_freq)] of the angles p * omega_j, repeated for
    the pair partner x_{j+d/2}, times the scaling's attention factor (1 but for YaRN)."""
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # same angle for x_j and x_{j+d/2}
    return angles.cos() * attention_factor, angles.sin() * attention_factor


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021) for queries and keys.

    The angle table for every position up to ``max_positions`` is computed once; calling the
    module with (q, k, start) rotates both by the angles of positions start .. start+T-1, so the
    dot product q_m . k_n depends only on the offset m - n. It plugs into
    :class:`~lmarch.nn.attention.MultiHeadAttention` as its ``qk_transform``. With YaRN scaling
    the tables carry its attention factor (cos and sin times ``attention_factor``), as
    transformers does. Scalings that depend on the sequence length (``dynamic``) need
    :class:`DynamicNTKRotaryEmbedding`; :func:`rotary_embedding` picks the class.
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
        if scaling is not None:
            check_rope_scaling(scaling, rotary_dim)
        if rope_scaling_type(scaling) == "dynamic":
            raise ValueError(
                "dynamic RoPE scaling depends on the length: DynamicNTKRotaryEmbedding"
            )
        self.max_positions, self.theta, self.rotary_dim, self.scaling = (
            max_positions,
            theta,
            rotary_dim,
            scaling,
        )
        self.attention_factor = rope_attention_factor(scaling)
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
            cos, sin = _angle_tables(inv_freq, positions, self.attention_factor)
        self.cos, self.sin = cos.to(device), sin.to(device)
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
        return _rotate(q, k, cos, sin, full)


class DynamicNTKRotaryEmbedding(nn.Module):
    """RoPE with dynamic NTK scaling (emozilla, 2023), as transformers' ``dynamic`` type runs it.

    A call whose last position is L - 1 rotates its queries and keys with the frequencies of
    :func:`dynamic_ntk_inverse_frequencies` for length L: plain RoPE while L <= the original
    context ``original_max_position_embeddings`` (default: ``max_positions``), a base that grows
    with L beyond it, up to ``max_positions``. Keys already in a cache keep the angles they were
    written with, as in transformers. (transformers also keeps the largest length seen across
    calls until a call fits the original context again; here each call uses its own length.)

    Not a :class:`RotaryEmbedding`: native kernels that read fixed angle tables do not take it.
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
        if rope_scaling_type(scaling) != "dynamic":
            raise ValueError(f"DynamicNTKRotaryEmbedding needs dynamic scaling, got {scaling!r}")
        assert scaling is not None
        rotary_dim = rotary_dim or head_dim
        check_rope_scaling(scaling, rotary_dim)
        self.max_positions, self.theta, self.rotary_dim, self.scaling = (
            max_positions,
            theta,
            rotary_dim,
            scaling,
        )
        self.factor = float(scaling["factor"])
        self.original_length = int(scaling.get("original_max_position_embeddings") or max_positions)
        # plain RoPE over the original context, where the dynamic base equals theta
        self.plain = RotaryEmbedding(
            head_dim, min(max_positions, self.original_length), theta, rotary_dim
        )

    def reset_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the plain tables of the original context."""
        self.plain.reset_tables(device)

    def forward(self, q: Tensor, k: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        t = q.shape[-2]
        if isinstance(start, int):
            if start + t <= self.original_length:
                return self.plain(q, k, start)
            if start + t > self.max_positions:
                raise ValueError(f"positions up to {start + t} exceed {self.max_positions}")
        positions = start + torch.arange(t, device=q.device)
        inv_freq = dynamic_ntk_inverse_frequencies(
            self.rotary_dim, self.theta, self.factor, self.original_length, positions[-1] + 1
        )
        cos, sin = _angle_tables(inv_freq, positions, 1.0)
        return _rotate(q, k, cos, sin, sin_signed=False)


def rotary_embedding(
    head_dim: int,
    max_positions: int,
    theta: float = 10000.0,
    rotary_dim: int | None = None,
    scaling: dict | None = None,
) -> RotaryEmbedding | DynamicNTKRotaryEmbedding:
    """The rotary module for ``scaling``: :class:`DynamicNTKRotaryEmbedding` for the ``dynamic``
    type, :class:`RotaryEmbedding` otherwise."""
    if rope_scaling_type(scaling) == "dynamic":
        return DynamicNTKRotaryEmbedding(head_dim, max_positions, theta, rotary_dim, scaling)
    return RotaryEmbedding(head_dim, max_positions, theta, rotary_dim, scaling)
