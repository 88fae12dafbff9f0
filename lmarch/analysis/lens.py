"""The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): read every layer's
residual stream through the model's own final norm and output head,

    logits_l = W_U norm_f(h_l),   l = 0 (the embeddings), 1, ..., L

and see at which depth the next-token guess forms. For the last layer this is exactly the
model's output. A masked LM (BERT-family ``mlm`` run) has no final norm outside its blocks; its
lens is the MLM head on each layer's states, a guess of each position's own token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmarch.analysis.attention_maps import model_inputs, token_strings
from lmarch.errors import LmarchError
from lmarch.loading.model import LoadedModel


@dataclass
class LensResult:
    """Per layer (row 0: the embeddings) and position: the top-k tokens and probabilities;
    ``logits`` [L + 1, T, V] holds the full read-outs."""

    tokens: list[str]
    layer_names: list[str]
    logits: Tensor
    top_tokens: list[list[list[str]]]  # [layer][position][k]
    top_probs: list[list[list[float]]]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (without the full logits)."""
        return {
            "tokens": self.tokens,
            "layers": self.layer_names,
            "top_tokens": self.top_tokens,
            "top_probs": self.top_probs,
        }


def _readout(loaded: LoadedModel) -> tuple[nn.ModuleList | None, nn.Module | None, object]:
    """(the layer stack, the module run on its input, the read-out h -> logits) of a model
    the lens understands: a GPT / LLaMA (``blocks``, ``norm_f``, ``lm_head``) or a BERT-family
    masked LM (``bert.blocks`` and its ``mlm`` head)."""
    model = loaded.model
    if all(hasattr(model, a) for a in ("blocks", "norm_f", "lm_head")):
        return model.blocks, model, lambda h: model.lm_head(model.norm_f(h))
    if hasattr(model, "mlm") and hasattr(model, "bert"):
        return model.bert.blocks, model, model.mlm
    raise LmarchError(
        f"{loaded.name} holds {loaded.describe()}, which has no output head to read layers through",
        hint="the logit lens reads GPT / LLaMA models and masked-LM runs (objective mlm)",
    )


@torch.no_grad()
def logit_lens(loaded: LoadedModel, text: str, k: int = 5) -> LensResult:
    """The logit lens of ``text`` for a model :func:`lmarch.load` read (float weights)."""
    if k < 1:
        raise LmarchError(f"--top must be >= 1, got {k}")
    blocks, _, readout = _readout(loaded)
    module, inputs, ids = model_inputs(loaded, text)
    if module is not loaded.model:
        module = loaded.model
    module.eval()
    states: list[Tensor] = []

    def first_input(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not states:
            states.append(args[0])

    def output(mod: nn.Module, args: tuple, out: Tensor) -> None:
        states.append(out)

    first = blocks[0]
    handles = [first.register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [b.register_forward_hook(output) for b in blocks]
    try:
        module(**inputs)
    finally:
        for h in handles:
            h.remove()
    logits = torch.stack([readout(h)[0] for h in states]).float()  # [L+1, T, V]
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    tok = loaded.tokenizer
    names = ["embeddings", *(f"layer {i + 1}" for i in range(len(states) - 1))]
    return LensResult(
        tokens=token_strings(tok, list(ids)),
        layer_names=names,
        logits=logits,
        top_tokens=[[token_strings(tok, row) for row in layer.tolist()] for layer in top_i],
        top_probs=[[[round(p, 6) for p in row] for row in layer.tolist()] for layer in top_p],
    )


def plot_lens(result: LensResult, path: str | Path, title: str = "") -> Path:
    """Layers (rows, embeddings at the bottom) by positions (columns): each cell the top
    guess, coloured by its probability — nostalgebraist's picture."""
    from lmarch.analysis.plots import plt

    n_layers, t = len(result.layer_names), len(result.tokens)
    top = [[row[0] for row in layer] for layer in result.top_probs]
    fig, ax = plt.subplots(
        figsize=(max(5.0, 0.9 * t + 2), max(3.5, 0.32 * n_layers + 1.5)), dpi=110
    )
    image = ax.imshow(top, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    fontsize = 7 if t <= 16 else 5
    for li, layer in enumerate(result.top_tokens):
        for pi, guesses in enumerate(layer):
            color = "white" if top[li][pi] > 0.6 else "black"
            ax.text(
                pi, li, guesses[0][:8], ha="center", va="center", fontsize=fontsize, color=color
            )
    ax.set_xticks(range(t), result.tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(n_layers), result.layer_names, fontsize=6)
    ax.set_xlabel("input position (its next-token guess in the cells)")
    fig.colorbar(image, ax=ax, label="probability of the top guess")
    ax.set_title(title or "logit lens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["LensResult", "logit_lens", "plot_lens"]
