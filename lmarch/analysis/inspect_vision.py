"""``lmarch inspect`` of an image-text model (a CLIP, the BLIP-style captioner, a Flamingo run):
parameters, the module tree, the weights' memory and forward FLOPs by part.

These models do not turn one token into the next the way a language model does, so FLOPs per
token alone would mislead: an image costs its tower's pass over 1 + (image_size / patch_size)^2
patch tokens, a text its own tower's (or decoder's) pass. Each part is counted on its own by
``torch.utils.flop_counter.FlopCounterMode`` (one image, one text of ``seq_len`` tokens), and
the model is loaded by :func:`lmarch.load` (the shapes runs are small; an HF CLIP folder is
read whole)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lmarch.analysis.memory import PRECISION_BYTES
from lmarch.errors import LmarchError
from lmarch.loading.model import CAPTION, CONTRASTIVE, FLAMINGO, LoadedModel

IMAGE_TEXT = (CONTRASTIVE, CAPTION, FLAMINGO)


@dataclass
class ImageTextReport:
    """What ``lmarch inspect`` prints for an image-text model: exact parameter counts, the
    module tree (:func:`lmarch.analysis.inspect.module_tree`) and measured forward FLOPs of
    each part (``flops``: what was run -> FLOPs)."""

    name: str
    family: str
    description: str
    seq_len: int
    precision: str
    params: int
    tree: list[Any]
    flops: dict[str, float]
    weights_bytes: int
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**vars(self), "tree": [vars(r) for r in self.tree]}


def _count(run: Callable[[], Any]) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # the math path's products are counted, the CPU's fused attention kernel is not; no
    # no_grad here: under it the counter's module tracker trips on the resampler's latents
    with counter, sdpa_kernel(SDPBackend.MATH):
        run()
    return float(counter.get_total_flops())


def _parts(loaded: LoadedModel, t: int) -> dict[str, float]:
    """FLOPs of one image and of one ``t``-token text through each part of the model."""
    m = loaded.model
    vision = m.config.vision if loaded.objective != FLAMINGO else m.vision.config
    pixels = torch.zeros(1, vision.n_channels, vision.image_size, vision.image_size)
    ids = torch.zeros(1, t, dtype=torch.long)
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    image, text = f"1 image, {patches} patches", f"{t}-token text"
    if loaded.objective == CONTRASTIVE:
        return {
            f"image tower + projection ({image})": _count(lambda: m.image_features(pixels)),
            f"text tower + projection (1 {text})": _count(lambda: m.text_features(ids)),
        }
    if loaded.objective == CAPTION:
        encode = _count(lambda: m.encode(pixels))
        decode = _count(lambda: m(pixels, ids)) - encode
        return {
            f"image encoder ({image})": encode,
            f"decoder + LM head, per token ({text})": decode / t,
        }
    lm = _count(lambda: m(ids))
    return {
        f"frozen LM alone, per token ({text})": lm / t,
        f"image path: tower, resampler, gated x-attn ({image}, {text})": _count(
            lambda: m(ids, pixels)
        )
        - lm,
    }


def inspect_image_text(
    loaded: LoadedModel, seq_len: int | None, precision: str, description: str
) -> ImageTextReport:
    """The report of an image-text model :func:`lmarch.load` returned, for texts of
    ``seq_len`` tokens (default: the longest the model reads)."""
    from lmarch.analysis.inspect import module_tree

    limit = int(loaded.model.config.block_size)
    t = seq_len or limit
    if not 1 <= t <= limit:
        raise LmarchError(
            f"--seq-len must be in 1..{limit} for {loaded.name}, got {t}", hint="its text length"
        )
    model: nn.Module = loaded.model
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    config = {"family": loaded.family, **asdict(model.config)}
    if loaded.objective == FLAMINGO:  # the LM's config, and the image tower's beside it
        config["vision"] = asdict(model.vision.config)
    return ImageTextReport(
        name=loaded.name,
        family=loaded.family,
        description=description,
        seq_len=t,
        precision=precision,
        params=params,
        tree=module_tree(model),
        flops=_parts(loaded, t),
        weights_bytes=params * PRECISION_BYTES[precision],
        config=config,
    )


def render_image_text(report: ImageTextReport) -> str:
    """The report as plain text."""
    from lmarch.analysis.inspect import human, tree_lines

    r = report
    out = [
        f"{r.name} — {r.family}, {r.description}",
        f"parameters: {r.params:,} ({human(r.params)})",
        "",
        *tree_lines(r.tree),
        "",
        "forward FLOPs by part (FlopCounterMode)",
    ]
    width = max(map(len, r.flops))
    out += [f"  {k:<{width}}  {human(v)}" for k, v in r.flops.items()]
    out += ["", f"memory ({r.precision})", f"  weights            {human(r.weights_bytes, 'B')}"]
    return "\n".join(out)


__all__ = ["IMAGE_TEXT", "ImageTextReport", "inspect_image_text", "render_image_text"]
