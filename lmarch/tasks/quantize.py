"""``lmarch quantize``: store a model's Linear weights in fewer bits (weight-only) as a run
folder every command loads.

    lmarch quantize smollm2-135m --method int4 --group-size 32 --out runs/smollm2-int4
    lmarch generate runs/smollm2-int4 "Once upon a time"

Methods (the layers of :mod:`lmarch.quant`; activations stay in floating point):

=========  ==========================================================  ===================
method     weights                                                     bits per weight
=========  ==========================================================  ===================
``int8``   symmetric, one bfloat16 scale per output row                8 (+16 per row)
``int4``   asymmetric groups of G inputs (G = 32, 64, 128, 256),      4 + 32 / G
           bfloat16 scale and zero per group (PyTorch's int4 kernel)
``nf4``    QLoRA's NormalFloat, blocks of G (default 64), the block    4.127 (G = 64)
           maxima double-quantised to 8 bits
``q8_0``   llama.cpp's Q8_0: blocks of 32, one float16 scale           8.5
``q4_0``   llama.cpp's Q4_0: symmetric blocks of 32, one float16       4.5
           scale (stored as Q4_1 with m = -8 d, which is exact)
=========  ==========================================================  ===================

What stays in float, and why:

- token (and position) embedding tables: a lookup reads single rows, so it gains nothing from
  the matmul kernels, and their rounding would change every input the model sees;
- norms, biases and anything else that is not an ``nn.Linear`` weight;
- with ``nf4`` only, the output head, as in QLoRA: NF4 is dequantised on every call, and the head
  is the largest matrix (49152 x 576 in SmolLM2), so a quantised head would dominate decoding.
  With every other method the head is quantised too — it is the most expensive matmul of a
  decoding step — as its own copy when it is tied to the embedding table (which stays float).

Float parts stay float32; the int8 / int4 layers convert their inputs to bfloat16 themselves.
The folder is an ordinary run folder (:func:`lmarch.loading.saving.save_loaded`) whose
``config.json`` has ``"quant": {"method", "group_size", "layers"}`` (the quantised layers' names),
from which :func:`lmarch.load` rebuilds those layers before loading the state dict.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from lmarch.errors import LmarchError
from lmarch.loading import LoadedModel, load
from lmarch.loading.saving import save_loaded
from lmarch.loading.speed import STORED_METHODS
from lmarch.quant.apply import quantize_
from lmarch.quant.int4 import INT4_GROUP_SIZES
from lmarch.quant.nf4 import NF4_BLOCK_SIZES

__all__ = [
    "GROUP_SIZES",
    "METHODS",
    "check_method",
    "quantize_model",
    "quantize_to_folder",
]

METHODS = tuple(STORED_METHODS)  # int8, int4, nf4, q8_0, q4_0
# the group sizes each method takes (None: not a grouped method); the first is the default
GROUP_SIZES: dict[str, tuple[int | None, ...]] = {
    "int8": (None,),
    "int4": INT4_GROUP_SIZES,
    "nf4": (64, *(g for g in NF4_BLOCK_SIZES if g != 64)),
    "q8_0": (32,),
    "q4_0": (32,),
}


def check_method(method: str, group_size: int | None = None) -> int | None:
    """The group size ``method`` will use (``group_size``, or the method's default); refused
    with ``LmarchError``: an unknown method, a group size the method does not offer."""
    if method not in METHODS:
        raise LmarchError(f"unknown quantisation method {method!r}", hint=f"one of {METHODS}")
    sizes = GROUP_SIZES[method]
    if group_size is None:
        return sizes[0]
    if sizes == (None,):
        raise LmarchError(
            f"{method} has one scale per output row; --group-size does not apply to it",
            hint="leave --group-size out, or use --method int4",
        )
    if group_size not in sizes:
        raise LmarchError(
            f"{method} takes group size {' or '.join(map(str, sizes))}, got {group_size}"
        )
    return group_size


def _keeps_float(method: str):  # type: ignore[no-untyped-def]
    """The skip rule of the module docstring: NF4 keeps the output head in float."""
    if method == "nf4":
        return lambda name, layer: name == "lm_head"
    return None


def quantize_model(model: nn.Module, method: str, group_size: int | None = None) -> list[str]:
    """Quantise ``model``'s Linear layers in place as ``lmarch quantize`` does (see the module
    docstring for what stays float); returns the quantised layers' names. Refused: a bad method
    or group size, a layer the group size cannot divide, a model with LoRA adapters (merge them
    first) or without Linear layers to quantise."""
    from lmarch.peft import lora_layers

    group_size = check_method(method, group_size)
    if lora_layers(model):
        raise LmarchError(
            "the model carries LoRA adapters; quantize stores plain Linear layers",
            hint="merge the adapter first: lmarch merge RUN --out DIR",
        )
    before = {id(m) for m in model.modules() if type(m) is nn.Linear}
    try:
        quantize_(model, STORED_METHODS[method], group_size, skip=_keeps_float(method))
    except LmarchError as exc:  # quantize_'s hint speaks Python; say it in options
        message = str(exc.args[0])
        hint = "choose a --group-size that divides every layer's inputs"
        raise LmarchError(message, hint=hint if "group size" in message else None) from None
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is not nn.Linear
        and id(module) not in before
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    ]
    if not names:
        raise LmarchError(
            f"the model has no Linear layers to quantise to {method}",
            hint="quantize stores weight-only quantised Linear layers; this model has none",
        )
    return names


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LmarchError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LmarchError(
            f"--out {out} exists and is not empty",
            hint="choose a new folder, or add --force to write over it",
        )


def quantize_to_folder(
    model_spec: str | Path,
    method: str,
    out: str | Path,
    group_size: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Load ``model_spec`` in float32 (anything :func:`lmarch.load` takes), quantise it
    (:func:`quantize_model`) and write it to ``out`` as a run folder; returns a summary
    (method, group size, layers, file sizes in bytes, seconds)."""
    start = time.perf_counter()
    group_size = check_method(method, group_size)
    out = Path(out)
    _check_out(out, force)  # refused before the (possibly slow) load
    loaded: LoadedModel = load(model_spec, quant="none")
    if loaded.quant != "none":
        raise LmarchError(
            f"{loaded.name} is already stored quantised ({loaded.quant})",
            hint="quantise the float model it was made from",
        )
    names = quantize_model(loaded.model, method, group_size)
    info = {"method": method, "group_size": group_size, "layers": names}
    save_loaded(loaded, out, extra={"quant": info})
    weights = out / "checkpoint" / "model.safetensors"
    return {
        "model": loaded.name,
        "method": method,
        "group_size": group_size,
        "layers": len(names),
        "file_bytes": weights.stat().st_size,
        "out": str(out),
        "seconds": round(time.perf_counter() - start, 3),
    }
