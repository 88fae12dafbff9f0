"""Attention maps: the probabilities softmax(Q K^T / sqrt(d_k) + M) each head puts on each key.

The fused kernels never materialise these probabilities, so :func:`capture_attention` swaps,
for the duration of a ``with`` block, the attention function the layers call
(:func:`lmarch.nn.attention.scaled_dot_product_attention`) for one that computes the equation
written out — the same as :func:`lmarch.nn.attention.reference_attention` — and records each
layer's probabilities. The model files are not touched: a pre-hook on every attention module
says which layer is calling. Rotary positions, T5's relative bias, grouped-query heads and the
causal and padding masks all arrive in the arguments and are applied as the layers apply them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.loading.model import LoadedModel
from lmarch.nn import attention as attention_module
from lmarch.nn.attention import MultiHeadAttention, attention_scale, causal_mask, repeat_kv
from lmarch.nn.cross_attention import CrossAttention


@dataclass
class AttentionRecord:
    """One call of one attention layer: its module name and probabilities [B, H, T_q, T_k]."""

    name: str
    probs: Tensor


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(output, probabilities) of softmax(cap(q k^T * scale) + bias + M) v over [B, H, T, D]
    tensors (key/value heads repeated for grouped-query attention). M is -inf where the
    boolean ``mask`` (or the bottom-right aligned causal triangle) forbids; a query that may
    see no key gets zeros, as the fused kernels give. cap(s) = c tanh(s / c) with ``softcap``
    c (Gemma 2), the identity without."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if is_causal:
        causal = causal_mask(q.shape[-2], k.shape[-2], q.device)
        mask = causal if mask is None else mask & causal
    scores = (q @ k.transpose(-2, -1)) * attention_scale(q.shape[-1], scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    return probs.to(v.dtype) @ v, probs


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[AttentionRecord]]:
    """Within the block, every attention layer of ``model`` computes its probabilities
    explicitly and appends them, in call order, to the yielded list (dropout is not applied:
    use the model in eval mode). A layer run several times (ALBERT's shared block) appears
    once per call."""
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (MultiHeadAttention, CrossAttention))
    ]
    if not layers:
        raise LmarchError(f"{type(model).__name__} has no attention layers to capture")
    records: list[AttentionRecord] = []
    calling: list[str] = [""]
    original = attention_module.scaled_dot_product_attention

    def recording(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        dropout_p: float = 0.0,
        implementation: str = "sdpa",
        scale: float | None = None,
        bias: Tensor | None = None,
        softcap: float | None = None,
        **unknown: object,
    ) -> Tensor:
        if unknown:  # an option this capture does not apply would give a wrong map
            raise LmarchError(f"attention capture does not know {', '.join(sorted(unknown))}")
        out, probs = explicit_attention(q, k, v, mask, is_causal, scale, bias, softcap)
        records.append(AttentionRecord(calling[0], probs.detach()))
        return out

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calling[0] = name

        return hook

    handles = [m.register_forward_pre_hook(pre_hook(name)) for name, m in layers]
    # every lmarch module that imported the function by name calls it through its own binding
    patched = [
        mod
        for mod_name, mod in list(sys.modules.items())
        if mod_name.startswith("lmarch.")
        and getattr(mod, "scaled_dot_product_attention", None) is original
    ]
    for mod in patched:
        mod.scaled_dot_product_attention = recording
    try:
        yield records
    finally:
        for mod in patched:
            mod.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


@dataclass
class AttentionMaps:
    """The tokens of a text and each attention layer's probabilities [H, T, T] (batch row 0),
    in the order the model runs them."""

    tokens: list[str]
    layers: list[AttentionRecord]


def token_strings(tokenizer: object, ids: list[int]) -> list[str]:
    """Each id as its own text, whitespace made visible (so a plot's labels can be read)."""
    out = []
    for i in ids:
        text = tokenizer.decode([i])
        if not text and hasattr(tokenizer, "id_to_token"):  # a special token decode drops
            text = tokenizer.id_to_token(i) or ""
        out.append(text.replace("\n", "\\n").replace(" ", "·") or f"<{i}>")
    return out


def model_inputs(loaded: LoadedModel, text: str) -> tuple[nn.Module, dict[str, Tensor], list[int]]:
    """(the module to run, its keyword inputs, the token ids) for ``text``: a causal LM reads
    the prompt's ids; a BERT-family model its encoder reads [CLS] text [SEP]. Other kinds
    (encoder-decoders, classifiers' heads) are refused."""
    from lmarch.models.heads import CAUSAL_LM, encoder_of

    if not text:
        raise LmarchError("the text is empty", hint='give some words, e.g. "To be or not to be"')
    if loaded.objective == CAUSAL_LM:
        ids = loaded.encode_prompt(text)
        return loaded.model, {"input_ids": torch.tensor([ids])}, ids
    if loaded.family == "bert" and hasattr(loaded.tokenizer, "encode_batch"):
        batch = loaded.tokenizer.encode_batch([text])
        inputs = {
            key: torch.as_tensor(batch[key], dtype=torch.long)
            for key in ("input_ids", "attention_mask", "token_type_ids")
        }
        encoder = encoder_of(loaded.model)
        return encoder, inputs, batch["input_ids"][0]
    raise LmarchError(
        f"{loaded.name} holds {loaded.describe()}",
        hint="attention maps and the logit lens read causal LMs and BERT-family encoders",
    )


@torch.no_grad()
def attention_maps(loaded: LoadedModel, text: str) -> AttentionMaps:
    """Every attention layer's probabilities on ``text`` for a model :func:`lmarch.load` read
    (float weights: load with ``quant="none"``)."""
    module, inputs, ids = model_inputs(loaded, text)
    module.eval()
    with capture_attention(module) as records:
        module(**inputs)
    if not records:
        raise LmarchError(f"{loaded.name}: no attention layer ran")
    layers = [AttentionRecord(r.name, r.probs[0].float()) for r in records]
    return AttentionMaps(token_strings(loaded.tokenizer, ids), layers)


def plot_attention(
    maps: AttentionMaps, layer: int, head: int | None, path: str | Path, title: str = ""
) -> Path:
    """A heatmap of layer ``layer``'s head ``head`` (query rows, key columns, token labels),
    or a grid of all its heads when ``head`` is None; saved as PNG (or SVG, by extension)."""
    from lmarch.analysis.plots import plt

    n_layers = len(maps.layers)
    if not -n_layers <= layer < n_layers:
        raise LmarchError(f"--layer must be in 0..{n_layers - 1}, got {layer}")
    record = maps.layers[layer]
    probs = record.probs.numpy()
    n_heads = probs.shape[0]
    if head is not None and not 0 <= head < n_heads:
        raise LmarchError(f"--head must be in 0..{n_heads - 1}, got {head}")
    heads = [head] if head is not None else list(range(n_heads))
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    t = len(maps.tokens)
    cell = 5.5 if len(heads) == 1 else 2.6
    size = (max(4.0, cell * cols), max(3.5, cell * rows))
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=110, squeeze=False)
    labels = t <= 40 and (len(heads) <= 4 or t <= 12)  # labels only where they can be read
    for ax, h in zip(axes.flat, heads):
        ax.imshow(probs[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        if labels:
            ax.set_xticks(range(t), maps.tokens, rotation=90, fontsize=7)
            ax.set_yticks(range(t), maps.tokens, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    fig.suptitle(title or f"layer {layer % n_layers} ({record.name}): query rows, key columns")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "AttentionMaps",
    "AttentionRecord",
    "attention_maps",
    "capture_attention",
    "explicit_attention",
    "model_inputs",
    "plot_attention",
    "token_strings",
]
