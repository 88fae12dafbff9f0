"""Memory of inference and training, counted from a model's config.

KV cache. Decoding keeps every past token's keys and values: per token, 2 x layers x kv_heads x
head_dim numbers — grouped-query attention (Ainslie et al. 2023) shrinks it n_heads / kv_heads
times. A recurrent model keeps a state of fixed size instead.

Training (mixed precision as in ZeRO, Rajbhandari et al. 2020, sec. 3.1): with Adam, each
parameter costs its weight, its gradient and two moments (fp32), plus an fp32 master copy when
the weights are 16-bit: 4 + 4 + 8 = 16 bytes in fp32, 2 + 2 + 4 + 8 = 16 bytes in bf16 / fp16.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", sec. 4.1): a transformer layer keeps, for the backward pass, the inputs of its norms,
projections and feed-forward and its attention probabilities — s b (34 d + 5 a s) bytes in
16-bit for a GPT layer with dropout, where the a s^2 b term is the softmax and its dropout.
:func:`training_memory` writes the same sum for lmarch's shapes (grouped-query, gated feed-
forwards, cross-attention) in elements, times the bytes of ``precision``. With activation
checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") a layer keeps
only its input, and one layer at a time recomputes its full activations in the backward pass.
Fused flash kernels (Dao et al. 2022) keep no probabilities: the s^2 term is then gone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lmarch.errors import LmarchError

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Layer:
    """What one layer keeps: width, heads, head width, feed-forward width, and whether it is
    gated and has cross-attention; ``recurrent`` marks an RNN layer (``gates`` blocks)."""

    d: int
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    ffn: int = 0
    gated: bool = False
    cross: bool = False
    rotary: bool = False  # RoPE keeps the queries and keys before and after rotation
    recurrent: int = 0  # gate blocks of a recurrent layer (4 LSTM, 3 GRU, 1 Elman)
    inputs: int = 0  # a recurrent layer's input width


def layer_shapes(config: Any) -> tuple[list[Layer], int, int]:
    """(the layers a token passes through, model width, output vocabulary — 0 for an encoder)."""
    from lmarch.models.registry import family_of_config

    family, c = family_of_config(config).name, config
    if family == "bigram":
        return [], c.vocab_size, c.vocab_size
    if family == "rnn":
        layers = [
            Layer(c.hidden_size, recurrent=c.gates, inputs=c.n_embd if i == 0 else c.hidden_size)
            for i in range(c.n_layer)
        ]
        return layers, c.hidden_size, c.vocab_size
    if family == "gpt":
        d = c.n_embd
        layer = Layer(d, c.n_head, c.n_head, d // c.n_head, c.n_inner or 4 * d)
        return [layer] * c.n_layer, d, c.vocab_size
    if family == "llama":
        hd = c.dim_per_head
        layer = Layer(c.n_embd, c.n_head, c.kv_heads, hd, c.intermediate_size, True, rotary=True)
        return [layer] * c.n_layer, c.n_embd, c.vocab_size
    if family == "bert":
        d = c.n_embd
        return [Layer(d, c.n_head, c.n_head, d // c.n_head, c.intermediate_size)] * c.n_layer, d, 0
    if family == "t5":
        d, h, hd, ff, g = c.n_embd, c.n_head, c.head_dim, c.intermediate_size, c.gated_ffn
        enc, dec = Layer(d, h, h, hd, ff, g), Layer(d, h, h, hd, ff, g, cross=True)
        return [enc] * c.n_layer + [dec] * c.decoder_layers, d, c.vocab_size
    if family in ("transformer", "bart"):
        d, he, hdec = c.n_embd, c.encoder_heads, c.decoder_heads
        enc = Layer(d, he, he, d // he, c.encoder_ffn)
        dec = Layer(d, hdec, hdec, d // hdec, c.decoder_ffn, cross=True)
        return [enc] * c.n_encoder_layer + [dec] * c.n_decoder_layer, d, c.decoder_vocab_size
    raise ValueError(f"no memory count for family {family!r}")


def kv_cache_bytes_per_token(config: Any, precision: str = "fp32") -> int:
    """Bytes of keys and values one decoded token adds to the cache (decoder self-attention
    only; an encoder-decoder's cross-attention cache is the same per *source* token). 0 for
    models that keep no per-token cache (encoders, recurrent LMs, the bigram table)."""
    layers, _, vocab = layer_shapes(config)
    per = sum(2 * la.kv_heads * la.head_dim for la in layers if not la.recurrent)
    from lmarch.models.registry import family_of_config

    family = family_of_config(config).name
    if family == "bert" or vocab == 0:
        return 0
    if family in ("t5", "transformer", "bart"):  # only the decoder's layers cache while decoding
        per = sum(2 * la.kv_heads * la.head_dim for la in layers if la.cross)
    return per * PRECISION_BYTES[precision]


def _layer_activations(la: Layer, s: int, b: int, p: int, dropout: bool) -> int:
    """Bytes one layer keeps for its backward pass (Korthikanti et al. 2022, sec. 4.1)."""
    if la.recurrent:  # the input, the gates and the cell/hidden states of each step
        return s * b * (la.inputs + la.recurrent * la.d + 2 * la.d) * p
    d, q, kv = la.d, la.heads * la.head_dim, la.kv_heads * la.head_dim
    attn = (
        s * b * (2 * d + q + 2 * kv + q) * p + la.heads * s * s * b * p
    )  # norm/proj ins, Q K V, probs
    if la.rotary:
        attn += s * b * (q + kv) * p
    if dropout:  # masks (1 byte) and the dropped probabilities
        attn += la.heads * s * s * b * (1 + p) + s * b * d
    # pre-activation and activation; a gated unit adds the up projection and the product
    ffn = s * b * (2 * d + la.ffn * (4 if la.gated else 2)) * p + (s * b * d if dropout else 0)
    cross = 0
    if la.cross:  # a second attention whose keys come from the encoder (same length here)
        cross = s * b * (2 * d + q + 2 * kv + q) * p + la.heads * s * s * b * p
    return attn + ffn + cross


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of a training step, by kind (see the module docstring for the sums)."""

    weights: int
    gradients: int
    optimizer: int
    master_weights: int
    activations: int
    activations_checkpointed: int

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer + master copy + activations."""
        return (
            self.weights + self.gradients + self.optimizer + self.master_weights + self.activations
        )

    @property
    def total_checkpointed(self) -> int:
        """The same with activation checkpointing."""
        return self.total - self.activations + self.activations_checkpointed

    def as_dict(self) -> dict[str, int]:
        """JSON-ready, totals included."""
        return {**asdict(self), "total": self.total, "total_checkpointed": self.total_checkpointed}


def training_memory(
    config: Any, n_params: int, seq_len: int, batch: int = 1, precision: str = "fp32"
) -> TrainingMemory:
    """Memory of one AdamW training step of ``config`` on ``batch`` x ``seq_len`` tokens."""
    if precision not in PRECISION_BYTES:
        raise LmarchError(
            f"unknown precision {precision!r}", hint=f"one of {', '.join(PRECISION_BYTES)}"
        )
    p = PRECISION_BYTES[precision]
    layers, d, vocab = layer_shapes(config)
    dropout = float(getattr(config, "dropout", 0.0) or 0.0) > 0
    s, b = seq_len, batch
    per_layer = [_layer_activations(la, s, b, p, dropout) for la in layers]
    # the embedding output, the final norm's input and the fp32 logits with their log-softmax
    ends = 2 * s * b * d * p + (2 * s * b * vocab * 4 if vocab else 0)
    full = sum(per_layer) + ends
    checkpointed = len(layers) * s * b * d * p + max(per_layer, default=0) + ends
    return TrainingMemory(
        weights=n_params * p,
        gradients=n_params * p,
        optimizer=n_params * 8,  # Adam's two moments, fp32
        master_weights=n_params * 4 if p < 4 else 0,
        activations=full,
        activations_checkpointed=min(full, checkpointed),
    )


__all__ = [
    "PRECISION_BYTES",
    "Layer",
    "TrainingMemory",
    "kv_cache_bytes_per_token",
    "layer_shapes",
    "training_memory",
]
