"""Image-text models for :func:`lmarch.load`: a ``lmarch clip train`` run or a Hugging Face CLIP
folder (objective ``contrastive``), a ``lmarch caption train`` run (a BLIP-style captioner,
``caption``) and a ``lmarch flamingo train`` run (a frozen GPT with Flamingo layers and its
image tower, ``flamingo``). Each comes with its image preprocessing
(:attr:`LoadedModel.preprocessor`); the tasks over them live in :mod:`lmarch.tasks.clip`,
:mod:`lmarch.tasks.caption` and :mod:`lmarch.tasks.flamingo`."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmarch.data.images import ImagePreprocessor
from lmarch.errors import LmarchError
from lmarch.loading.model import CAPTION, CONTRASTIVE, FLAMINGO, LoadedModel
from lmarch.loading.sources import Source, checkpoint_tensors
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.vit import ViT
from lmarch.peft.flamingo import FlamingoLM  # re-exported: its home is beside the adapter
from lmarch.weights.checkpoint import read_json

# run folders name the objective they were trained for in config.json; HF folders a model_type
HF_CLIP_TYPE = "clip"


def vision_objective(source: Source) -> str | None:
    """The image-text objective of a run or Hugging Face folder, or None for any other model."""
    if source.kind not in ("run", "hf"):
        return None
    config = read_json(source.path / "config.json")
    if not isinstance(config, dict):
        return None
    if source.kind == "hf":
        return CONTRASTIVE if config.get("model_type") == HF_CLIP_TYPE else None
    objective = config.get("objective")
    return objective if objective in (CONTRASTIVE, CAPTION, FLAMINGO) else None


def _preprocessor(run: dict[str, Any], where: str) -> ImagePreprocessor:
    image = run.get("image") or {}
    if not isinstance(image, dict):
        raise LmarchError(f"{where}: 'image' is not a table of preprocessing settings")
    try:
        return ImagePreprocessor(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in image.items()}
        )
    except TypeError as exc:
        raise LmarchError(f"{where}: bad image settings: {exc}") from exc


def _run_model(source: Source, model: nn.Module) -> nn.Module:
    from lmarch.weights.safetensors_io import load_into_model

    tensors, where = checkpoint_tensors(source)
    load_into_model(model, tensors, source=where)
    return model.eval()


def read_clip(source: Source) -> LoadedModel:
    """A CLIP (Radford et al. 2021): a ``lmarch clip train`` run, or a Hugging Face CLIP folder
    with its BPE tokenizer and ``preprocessor_config.json``."""
    from lmarch.models.clip import CLIP, CLIPConfig

    if source.kind == "hf":
        from lmarch.tokenizers.clip_bpe import clip_tokenizer_from_hf_folder
        from lmarch.weights.hf_clip import load_hf_clip

        model = load_hf_clip(source.path).eval()
        tokenizer = clip_tokenizer_from_hf_folder(source.path)
        preprocessor = ImagePreprocessor.from_hf_folder(source.path)
    else:
        from lmarch.models.registry import config_from_dict
        from lmarch.tokenizers.base import load_tokenizer

        run = read_json(source.path / "config.json")
        config = config_from_dict(run["model"])
        if not isinstance(config, CLIPConfig):
            raise LmarchError(f"{source.path}: the run's model is not a CLIP")
        model = _run_model(source, CLIP(config))
        tokenizer = load_tokenizer(source.path / "tokenizer.json")
        preprocessor = _preprocessor(run, str(source.path / "config.json"))
    # an HF folder's name is its last part; the path itself says where to find it again
    name = str(source.path) if source.kind == "hf" else source.name
    return LoadedModel(model, tokenizer, name, "clip", CONTRASTIVE, preprocessor=preprocessor)


def read_captioner(source: Source) -> LoadedModel:
    """A ``lmarch caption train`` run: the BLIP-style captioner (Li et al. 2022) with its
    tokenizer and image preprocessing."""
    from lmarch.models.blip import Blip, BlipConfig
    from lmarch.tokenizers.base import load_tokenizer

    run = read_json(source.path / "config.json")
    try:
        config = BlipConfig(**{k: v for k, v in run["model"].items() if k != "family"})
    except (KeyError, TypeError) as exc:
        raise LmarchError(f"{source.path / 'config.json'}: bad captioner config: {exc}") from exc
    model = _run_model(source, Blip(config))
    tokenizer = load_tokenizer(source.path / "tokenizer.json")
    preprocessor = _preprocessor(run, str(source.path / "config.json"))
    return LoadedModel(model, tokenizer, source.name, "blip", CAPTION, preprocessor=preprocessor)


def read_flamingo(source: Source) -> LoadedModel:
    """A ``lmarch flamingo train`` run: the GPT as an ordinary run, its Flamingo layers and
    image tower in ``adapter.safetensors`` beside it, as one :class:`FlamingoLM`."""
    from lmarch.models.registry import config_from_dict
    from lmarch.models.vit import ViTConfig
    from lmarch.peft.flamingo import add_flamingo
    from lmarch.tokenizers.base import load_tokenizer
    from lmarch.weights.safetensors_io import load_into_model, load_tensors

    where = source.path / "config.json"
    run = read_json(where)
    try:
        settings = run["flamingo"]
        n_latents, n_head = int(settings["n_latents"]), int(settings["n_head"])
        vision = ViT(ViTConfig(**run["vision"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise LmarchError(f"{where}: bad Flamingo settings: {exc}") from exc
    lm_config = config_from_dict(run["model"])
    if not isinstance(lm_config, GPTConfig):
        raise LmarchError(f"{where}: the run's LM is not a GPT")
    lm = _run_model(source, GPT(lm_config))
    adapter = add_flamingo(lm, vision.config.n_embd, n_latents=n_latents, n_head=n_head)
    path = source.path / "adapter.safetensors"
    tensors = load_tensors(path)
    for prefix, module in (("vision.", vision), ("adapter.", adapter)):
        part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_into_model(module, part, source=str(path))
    model = FlamingoLM(lm, vision, adapter).eval()
    tokenizer = load_tokenizer(source.path / "tokenizer.json")
    preprocessor = _preprocessor(run, str(where))
    return LoadedModel(model, tokenizer, source.name, "gpt", FLAMINGO, preprocessor=preprocessor)


READERS = {CONTRASTIVE: read_clip, CAPTION: read_captioner, FLAMINGO: read_flamingo}


def read_vision(source: Source, objective: str) -> LoadedModel:
    """The image-text model of ``source`` whose objective :func:`vision_objective` found."""
    return READERS[objective](source)


__all__ = [
    "READERS",
    "FlamingoLM",
    "read_captioner",
    "read_clip",
    "read_flamingo",
    "read_vision",
    "vision_objective",
]
