"""``lmarch export CLIP_RUN --format hf``: transformers reads the folder as the same CLIP.

A tiny CLIP run (one training step on the shapes) is exported through the command line. With
transformers alone — ``CLIPModel``, and ``CLIPProcessor`` reading the folder's tokenizer and
image preprocessing — two real photographs and three captions (one of words the run's
vocabulary lacks, cut at the model's 16 tokens) give lmarch's image and text embeddings and
``logits_per_image`` (float32, max abs error <= 1e-5; measured 5e-7 on the logits), from the
same token ids and attention mask and the same pixels (exact). ``lmarch.load`` reads the folder
back to what the run computes, bit for bit. The image-text runs transformers has no class for,
and GGUF for a CLIP, are refused in one line that says why; a refusal writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import lmarch
from lmarch.data.images import load_image, skimage_photo
from lmarch.tasks import caption, clip, flamingo

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(batch_size=4, n_embd=16, n_layer=1, n_head=2, image_size=16, patch_size=8)
CAPTIONS = ["a red circle", "a blue square left of a green triangle", "Zebras at Noon, 1999!"]
PHOTOS = ("astronaut.png", "rocket.jpg")


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "run"
    clip.train_clip(clip.ClipTrainConfig(steps=1, **TINY), out)
    return out


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def test_clip_run_exports_as_transformers_clip(clip_run: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "hf"
    summary = cli.json("export", clip_run, "--format", "hf", "--out", out)
    assert summary["model_type"] == "clip"
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    ours = lmarch.load(clip_run)
    theirs = transformers.CLIPModel.from_pretrained(out).eval()
    processor = transformers.CLIPProcessor.from_pretrained(out)
    images = [load_image(skimage_photo(p)) for p in PHOTOS]
    inputs = processor(
        text=CAPTIONS,
        images=images,
        padding="max_length",
        truncation=True,
        max_length=16,
        return_tensors="pt",
    )
    ids = ours.tokenizer.encode_batch(CAPTIONS, max_length=16)
    assert inputs["input_ids"].tolist() == ids["input_ids"]
    assert inputs["attention_mask"].tolist() == ids["attention_mask"]
    pixels = ours.preprocessor(images)
    assert torch.equal(inputs["pixel_values"], pixels)
    ref = theirs(**inputs)
    mask = inputs["attention_mask"]
    image = ours.model.image_features(pixels)
    text = ours.model.text_features(inputs["input_ids"], mask)
    logits = ours.model(inputs["input_ids"], pixels, mask).logits_per_image
    unit = torch.nn.functional.normalize
    assert _max_error(unit(image, dim=-1), ref.image_embeds) <= 1e-5
    assert _max_error(unit(text, dim=-1), ref.text_embeds) <= 1e-5
    assert _max_error(logits, ref.logits_per_image) <= 1e-5
    # lmarch reads the folder back: the same model, tokenizer and preprocessing
    back = lmarch.load(out)
    assert (back.family, back.objective, back.preprocessor) == (
        "clip",
        "contrastive",
        ours.preprocessor,
    )
    assert back.tokenizer.encode_batch(CAPTIONS, max_length=16) == ids
    assert torch.equal(back.model(inputs["input_ids"], pixels, mask).logits_per_image, logits)
    assert torch.equal(back.model.text_features(inputs["input_ids"], mask), text)


def test_refusals_name_why(clip_run: Path, tmp_path: Path, cli) -> None:
    caption_run, flamingo_run = tmp_path / "caption", tmp_path / "flamingo"
    caption.train_captioner(caption.CaptionTrainConfig(steps=1, **TINY), caption_run)
    flamingo.train_flamingo(
        flamingo.FlamingoTrainConfig(clip_steps=1, lm_steps=1, steps=1, n_latents=2, **TINY),
        flamingo_run,
    )
    hint = " (hint: export works for GPT, LLaMA (and its variants), BERT-family, T5, BART and CLIP)"
    assert cli.error("export", caption_run, "--format", "hf", "--out", tmp_path / "a") == (
        "lmarch export: error: a captioner run (lmarch caption train) has no transformers "
        "counterpart: transformers' BLIP pairs a separate text encoder with its decoder, this "
        "captioner has one causal decoder for captions and matching" + hint
    )
    assert cli.error("export", flamingo_run, "--format", "hf", "--out", tmp_path / "b") == (
        "lmarch export: error: a Flamingo run (lmarch flamingo train) has no transformers "
        "counterpart: transformers has no Flamingo model for gated cross-attention layers in a "
        "frozen GPT" + hint
    )
    assert cli.error("export", clip_run, "--format", "gguf", "--out", tmp_path / "c.gguf") == (
        "lmarch export: error: CLIP has no GGUF export (LLaMA family only)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caption", "flamingo"]  # nothing written
