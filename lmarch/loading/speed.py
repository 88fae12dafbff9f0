"""How a loaded model is made fast: which quantisation ``quant="auto"`` means for a file, and
the two steps that follow a choice (quantise in :mod:`lmarch.quant`, swap in native layers from
:mod:`lmarch.native`).

``auto`` is the fastest exact path: a GGUF whose projections are stored in the block formats
lmarch's native kernels take as they are (all Q4_0 / Q4_1, or all Q8_0, with a Q8_0 output
head, as llama.cpp writes its Q4 and Q8 files) runs on those blocks (``"q4"`` / ``"q8"``), with
greedy tokens equal to the float32 model's (tests/test_loading.py); so does a Gemma 3 file whose
mixed formats are each kept exactly (``"q4"``, :mod:`lmarch.quant.gguf_gemma`). Without the native kernels (no C compiler, or
``LMARCH_NATIVE=0``) it falls back to float32 with one notice
(:class:`~lmarch.errors.LmarchNotice`, one line on stderr from the command line). Any other model:
float (``"none"``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lmarch.errors import LmarchError, LmarchNotice

if TYPE_CHECKING:
    from lmarch.weights.gguf import GGUFFile

QUANT_CHOICES = ("auto", "none", "int8", "int4", "q8", "q4")
# the block formats each scheme copies as stored (BlockQ4Linear / BlockQ8Linear)
NATIVE_BLOCK_TYPES = {"q4": ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"), "q8": ("Q8_0",)}
# the output head: a BlockQ8Linear, or a K-quant head as stored (KQuantLinear), in both schemes
NATIVE_HEAD_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")
# Gemma 3's block loader (lmarch.quant.gguf_gemma) keeps each of these exactly (Q5_0 as Q8_0)
GEMMA_EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def gguf_native_scheme(path: str | Path) -> str | None:
    """``"q4"`` when every 2-D tensor of the file's layers is stored as Q4_0 / Q4_1 / Q4_K /
    Q5_K / Q6_K, ``"q8"`` when every one is Q8_0 — in both cases with the output head (or the
    embedding table it is tied to) in Q8_0 or a K-quant of those — else None: the block loader then
    takes every block as it is, without a second rounding. A Gemma 3 file is ``"q4"`` when
    each of its matrices is in a format :mod:`lmarch.quant.gguf_gemma` keeps exactly (its
    Q4_K_M files: Q4_K, Q6_K, Q5_0 and Q8_0)."""
    from lmarch.weights.gguf import read_gguf

    gguf = read_gguf(path)
    try:
        return native_scheme_of(gguf)
    finally:
        gguf.close()


def native_scheme_of(gguf: GGUFFile) -> str | None:
    """:func:`gguf_native_scheme` of an open file."""
    infos = {name: gguf.tensor_info(name) for name in gguf.tensor_names}
    arch = gguf.metadata.get("general.architecture")
    layers = {i.type_name for n, i in infos.items() if n.startswith("blk.") and len(i.shape) == 2}
    head = infos.get("output.weight") or infos.get("token_embd.weight")
    if arch == "gemma3":  # mixed formats, each kept exactly: "q4" names that loader
        exact = set(GEMMA_EXACT_TYPES)
        whole = head is not None and {head.type_name, *layers} <= exact
        return "q4" if layers and whole else None
    if arch != "llama":  # the other block loaders build LLaMA layers only
        return None
    if not layers or head is None or head.type_name not in NATIVE_HEAD_TYPES:
        return None
    return next((s for s, types in NATIVE_BLOCK_TYPES.items() if layers <= set(types)), None)


def native_ready(quiet: bool = False) -> bool:
    """True when lmarch's native kernels are built and loaded here; ``quiet`` keeps the build
    failure's warning to itself (the caller says it in its own words)."""
    from lmarch import native

    if not quiet:
        return native.native_available()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return native.native_available()


def choose_quant(quant: str, kind: str, path: Path, device: str, dtype: object) -> str:
    """The quantisation to load with: ``quant`` itself, or what ``"auto"`` means for this
    source (see the module docstring). An explicit ``"q4"`` / ``"q8"`` without the native
    kernels is refused: the layers' PyTorch fallback decodes slower than float32."""
    if quant not in QUANT_CHOICES:
        raise LmarchError(
            f"unknown quantisation {quant!r}", hint=f"one of {', '.join(QUANT_CHOICES)}"
        )
    if quant == "auto":
        # an asked-for dtype or device means a float model; only a GGUF has blocks to keep
        if kind != "gguf" or dtype is not None or device != "cpu":
            return "none"
        from lmarch.weights.gguf import read_gguf

        gguf = read_gguf(path)
        scheme = native_scheme_of(gguf)
        if scheme is None:
            gguf.close()
            return "none"
        if not native_ready(quiet=True):
            gguf.close()
            warnings.warn(
                "native kernels unavailable (no C compiler, or LMARCH_NATIVE=0): running in "
                f"float32, slower than on the file's {scheme} blocks; --quant none avoids this "
                "notice",
                LmarchNotice,
                stacklevel=3,
            )
            return "none"
        from lmarch.quant.gguf import hand_over

        hand_over(path, gguf)  # the block loader reads this parse instead of parsing again
        return scheme
    if quant in ("q4", "q8"):
        if device != "cpu":
            raise LmarchError(f"--quant {quant} runs on the CPU only, not on {device}")
        if not native_ready():
            raise LmarchError(
                f"--quant {quant} needs lmarch's native kernels, which could not be built here",
                hint="install a C compiler (or set CC), or use --quant int4 / int8",
            )
    return quant


# ``lmarch quantize`` methods -> the :mod:`lmarch.quant.apply` scheme their layers are
STORED_METHODS = {"int8": "int8", "int4": "int4", "nf4": "nf4", "q8_0": "q8", "q4_0": "q4_0"}


def stored_quant(run_config: dict[str, Any]) -> str:
    """The method a run folder's weights are stored in (its ``"quant"`` entry, written by
    ``lmarch quantize``), or ``"none"``."""
    info = run_config.get("quant")
    if info is None:
        return "none"
    if not isinstance(info, dict) or info.get("method") not in STORED_METHODS:
        raise LmarchError(
            f"the run config's 'quant' entry is damaged: {info!r}",
            hint=f"method must be one of {', '.join(STORED_METHODS)}",
        )
    return str(info["method"])


def rebuild_quantized(model: nn.Module, run_config: dict[str, Any]) -> nn.Module:
    """Give a freshly built float model the quantised layers its run folder stores (the
    ``"layers"`` named in ``"quant"``), so that the saved state dict loads into it."""
    method = stored_quant(run_config)
    if method == "none":
        return model
    from lmarch.quant.apply import restore_quantized_

    info = run_config["quant"]
    layers = info.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise LmarchError("the run config's 'quant' entry is damaged: 'layers' is not a list")
    return restore_quantized_(model, STORED_METHODS[method], info.get("group_size"), layers)


def accept_stored_quant(name: str, stored: str, quant: str) -> str:
    """A model stored quantised loads as it is stored: ``quant`` must be ``"auto"``,
    ``"none"`` (no further quantisation) or the stored method itself."""
    if quant not in ("auto", "none", stored, STORED_METHODS[stored]):
        raise LmarchError(
            f"{name} is stored quantised as {stored}; it cannot be loaded as {quant}",
            hint="leave --quant at auto, or quantise the float model instead",
        )
    return stored


def quantize_and_accelerate(model: nn.Module, have: str, want: str) -> None:
    """Bring ``model`` (quantised as ``have``) to ``want``: quantise a float model
    (:func:`lmarch.quant.apply.quantize_for_decoding`), then, for the block formats, swap in
    the native layers (:func:`lmarch.native.accelerate`)."""
    from lmarch.quant.apply import quantize_for_decoding

    if have != want:
        if have != "none":
            raise LmarchError(f"a model loaded as {have} cannot be requantised to {want}")
        quantize_for_decoding(model, want)
    if want in ("q4", "q8", "q4_0", "q8_0"):
        from lmarch.native import accelerate

        # each SwiGLU block one native call, each LLaMA layer one native call per token
        accelerate(model, training=False)


__all__ = [
    "GEMMA_EXACT_TYPES",
    "QUANT_CHOICES",
    "STORED_METHODS",
    "accept_stored_quant",
    "choose_quant",
    "gguf_native_scheme",
    "native_ready",
    "native_scheme_of",
    "quantize_and_accelerate",
    "rebuild_quantized",
    "stored_quant",
]
