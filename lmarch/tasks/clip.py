"""CLIP as a task: train on the generated shapes, classify images zero-shot, retrieve.

Training (Radford et al. 2021, figure 3): a batch of n image-caption pairs, the n x n scores
exp(t) I_e T_e^T, a symmetric cross-entropy towards the matching pairs. The shapes set repeats
captions within a batch ("a red circle" twice), so the targets spread over every caption equal
to the image's own: identical texts are positives for each other, not negatives.

Zero-shot classification: each label becomes a text ("a red circle"); an image's class is the
label whose text embedding is closest to the image's (the paper's sec. 3.1.1).
Retrieval: recall@k is the share of queries whose k best answers hold a correct one (here, one
with the same caption: images that look alike share captions).

A trained run is a folder like any other lmarch run (``checkpoint/model.safetensors``,
``tokenizer.json``, ``config.json`` with ``"objective": "contrastive"``); a Hugging Face CLIP
folder loads too; both through :func:`lmarch.load` (:func:`load_clip` wraps it), with their
own tokenizer and image preprocessing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmarch.data.images import ImagePreprocessor
from lmarch.data.shapes import RELATIONS, all_pairs, describe, shapes_dataset, to_pixels
from lmarch.errors import LmarchError
from lmarch.loading.model import CONTRASTIVE
from lmarch.models.clip import CLIP, CLIPConfig
from lmarch.models.registry import config_to_dict
from lmarch.models.vit import ViTConfig
from lmarch.tokenizers.bpe import bytes_to_unicode
from lmarch.tokenizers.clip_bpe import BOS, EOS, clip_pipeline
from lmarch.tokenizers.hf_fallback import HFTokenizersFallback

OBJECTIVE = CONTRASTIVE
# the shapes' pixels: 0..255 -> -1..1 (lmarch.data.shapes.to_pixels), as a preprocessor
SHAPES_PREPROCESSOR = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), do_center_crop=True)


def check_small_vision_config(config: Any) -> None:
    """Refuse, in one line, the sizes a small image-text model on the shapes set cannot be
    built from (``steps``, ``batch_size``, ``n_embd``, ``n_layer``, ``n_head``, ``image_size``,
    ``patch_size``): the settings CLIP and the captioner share."""
    names = ("steps", "batch_size", "n_embd", "n_layer", "n_head", "image_size", "patch_size")
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise LmarchError(f"{name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head:
        raise LmarchError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    if config.image_size % config.patch_size or config.image_size < 8:
        raise LmarchError(
            f"image_size ({config.image_size}) must be a multiple of patch_size "
            f"({config.patch_size}) and at least 8"
        )


@dataclass
class ClipTrainConfig:
    """A CLIP trained from scratch on the shapes set (defaults: a CPU-minute run)."""

    steps: int = 300
    batch_size: int = 64  # half one-object, half two-object images
    learning_rate: float = 2e-3
    min_lr: float = 1e-4
    warmup_iters: int = 30
    weight_decay: float = 0.01
    n_embd: int = 64  # width of both towers and of the joint space
    n_layer: int = 2
    n_head: int = 4
    image_size: int = 32
    patch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_small_vision_config(self)
        if self.batch_size < 2:
            raise LmarchError("batch_size must be at least 2 (a contrastive batch needs negatives)")


@dataclass
class ClipModel:
    """A CLIP with what it needs to read text and images."""

    model: CLIP
    tokenizer: HFTokenizersFallback
    preprocessor: ImagePreprocessor
    name: str

    def encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [B, T] (start and end tokens, padded, cut at the
        model's longest text)."""
        batch = self.tokenizer.encode_batch(list(texts), max_length=self.model.config.block_size)
        return torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Unit-length text embeddings [B, projection_dim]."""
        ids, mask = self.encode_texts(texts)
        return F.normalize(self.model.text_features(ids, mask), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, pixels: Tensor) -> Tensor:
        """Unit-length image embeddings [B, projection_dim] of preprocessed pixels."""
        return F.normalize(self.model.image_features(pixels), dim=-1)


def shapes_tokenizer(extra_words: Sequence[str] = ()) -> HFTokenizersFallback:
    """CLIP's tokenizer (:mod:`lmarch.tokenizers.clip_bpe`) with a vocabulary for the shapes'
    words (and ``extra_words``): the 512 byte symbols, merges that build each word left to
    right, and the two special tokens; any other text still encodes, byte by byte."""
    words = ["a", *(w for rel in RELATIONS for w in rel.split())]
    words += [c for c, _ in all_pairs()] + [s for _, s in all_pairs()] + list(extra_words)
    symbols = list(bytes_to_unicode().values())
    vocab, merges = symbols + [s + "</w>" for s in symbols], []
    for word in dict.fromkeys(words):
        parts = [*word[:-1], word[-1] + "</w>"]
        built = parts[0]
        for part in parts[1:]:
            merges.append(f"{built} {part}")
            built += part
            vocab.append(built)
    vocab = [*dict.fromkeys(vocab), BOS, EOS]
    return HFTokenizersFallback(
        clip_pipeline({t: i for i, t in enumerate(vocab)}, merges), {"pad": EOS}
    )


def build_shapes_clip(config: ClipTrainConfig, vocab_size: int, eos_token_id: int) -> CLIP:
    """A small CLIP for the shapes' images and captions."""
    c = config
    vision = ViTConfig(
        image_size=c.image_size, patch_size=c.patch_size, n_layer=c.n_layer, n_head=c.n_head,
        n_embd=c.n_embd, intermediate_size=2 * c.n_embd, activation="quick_gelu",
        layer_norm_eps=1e-5, variant="clip",
    )  # fmt: skip
    model_config = CLIPConfig(
        vocab_size=vocab_size, block_size=16, n_layer=c.n_layer, n_head=c.n_head,
        n_embd=c.n_embd, intermediate_size=2 * c.n_embd, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id, projection_dim=c.n_embd, vision=vision,
    )  # fmt: skip
    return CLIP(model_config)


def shared_caption_loss(logits_per_image: Tensor, captions: Sequence[str]) -> Tensor:
    """The symmetric contrastive loss with every pair of identical captions a positive: each
    row's target spreads evenly over the columns whose caption equals its own (with distinct
    captions, :func:`lmarch.models.clip.contrastive_loss`)."""
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits_per_image.device)
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_loss = F.cross_entropy(logits_per_image, targets)
    text_loss = F.cross_entropy(logits_per_image.t(), targets)
    return (image_loss + text_loss) / 2


def _schedule(config: ClipTrainConfig) -> Any:
    from lmarch.train.config import TrainConfig

    return TrainConfig(
        learning_rate=config.learning_rate, min_lr=config.min_lr,
        warmup_iters=min(config.warmup_iters, config.steps), max_iters=config.steps,
        weight_decay=config.weight_decay, beta2=0.98, batch_size=config.batch_size,
    )  # fmt: skip


def train_clip(
    config: ClipTrainConfig,
    out: str | Path,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a CLIP on fresh shapes batches (each step draws new images from its own seed) with
    the house's AdamW and warmup + cosine schedule; the temperature exp(t) is clipped at 100 as
    in the paper. Writes a run folder to ``out``; returns a summary of the run."""
    from lmarch.train.optim import build_optimizer, learning_rate_at
    from lmarch.weights.model_folder import write_model_folder

    torch.manual_seed(config.seed)
    tokenizer = shapes_tokenizer()
    model = build_shapes_clip(config, tokenizer.vocab_size, tokenizer.token_to_id(EOS))
    run = ClipModel(model, tokenizer, shapes_preprocessor(config.image_size), "shapes")
    schedule = _schedule(config)
    optimizer = build_optimizer(model, schedule)
    half = config.batch_size // 2
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        seed = config.seed * 1_000_003 + step
        batch = shapes_dataset(half, seed, "train", 1, config.image_size)
        batch += shapes_dataset(config.batch_size - half, seed, "train", 2, config.image_size)
        captions = [e.caption for e in batch]
        ids, mask = run.encode_texts(captions)
        loss = shared_caption_loss(model(ids, to_pixels(batch), mask).logits_per_image, captions)
        if not torch.isfinite(loss):
            raise LmarchError(f"the loss is {loss.item()} at step {step}", hint="lower the rate")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    seconds = time.perf_counter() - start
    run_config = {
        "model": config_to_dict(model.config),
        "objective": OBJECTIVE,
        "clip_train": asdict(config),
        "image": asdict(run.preprocessor),
    }
    write_model_folder(out, model, tokenizer, run_config)
    first = sum(losses[:10]) / len(losses[:10])
    last = sum(losses[-10:]) / len(losses[-10:])
    return {"out": str(out), "steps": config.steps, "loss_first": first, "loss_last": last,
            "train_s": seconds, "temperature": float(model.logit_scale.detach().exp())}  # fmt: skip


def shapes_preprocessor(image_size: int) -> ImagePreprocessor:
    """The preprocessing that gives a photo the shapes' pixel range, at the shapes' size."""
    return ImagePreprocessor(size=image_size, crop=image_size, **SHAPES_PREPROCESSOR)


def load_clip(spec: str | Path) -> ClipModel:
    """A CLIP from a ``lmarch clip train`` run folder or a Hugging Face CLIP folder (with its
    tokenizer and ``preprocessor_config.json``), read by :func:`lmarch.load`."""
    from lmarch.loading import load

    loaded = load(spec, quant="none").require("clip", "lmarch clip")
    return ClipModel(loaded.model, loaded.tokenizer, loaded.preprocessor, loaded.name)


def zero_shot(run: ClipModel, pixels: Tensor, labels: Sequence[str]) -> Tensor:
    """Probabilities [n images, n labels]: softmax over exp(t) cos(image, label text)."""
    if len(labels) < 2:
        raise LmarchError("zero-shot classification needs at least two labels")
    scale = run.model.logit_scale.exp()
    scores = run.image_embeddings(pixels) @ run.text_embeddings(labels).t() * scale
    return scores.softmax(dim=-1)


def recall_at(scores: Tensor, query_keys: Sequence[str], item_keys: Sequence[str], k: int) -> float:
    """Share of queries (rows of ``scores``) whose ``k`` best items hold one with the query's
    own key (here: the same caption)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
    hits = sum(any(item_keys[j] == query_keys[i] for j in row) for i, row in enumerate(top))
    return hits / len(query_keys)


def evaluate_shapes(run: ClipModel, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Zero-shot accuracy over the 12 colour-shape labels on one-object images of the ``test``
    split (pairs seen in training) and the ``heldout`` split (pairs never seen), and
    image <-> text recall@1/5 among ``n`` two-object test images and their captions."""
    if n < 5:
        raise LmarchError(f"evaluate at least 5 images, got {n}")
    size = run.model.config.vision.image_size
    labels = [describe(p) for p in all_pairs()]
    result: dict[str, Any] = {"n": n, "labels": len(labels), "chance": 1 / len(labels)}
    for split in ("test", "heldout"):
        examples = shapes_dataset(n, seed, split, 1, size)
        probs = zero_shot(run, to_pixels(examples), labels)
        predicted = [labels[i] for i in probs.argmax(dim=1).tolist()]
        right = sum(p == e.caption for p, e in zip(predicted, examples))
        result[f"zero_shot_{split}"] = right / n
    examples = shapes_dataset(n, seed, "test", 2, size)
    captions = [e.caption for e in examples]
    scores = run.image_embeddings(to_pixels(examples)) @ run.text_embeddings(captions).t()
    for k in (1, 5):
        result[f"image_to_text_r{k}"] = recall_at(scores, captions, captions, k)
        result[f"text_to_image_r{k}"] = recall_at(scores.t(), captions, captions, k)
    return result


def rank_images(run: ClipModel, text: str, images: Sequence[Any]) -> list[tuple[int, float]]:
    """Images (paths, PIL images or arrays) ordered by cosine similarity to ``text``:
    (index, similarity) pairs, best first."""
    if not images:
        raise LmarchError("give at least one image to rank")
    sims = (run.image_embeddings(run.preprocessor(images)) @ run.text_embeddings([text]).t())[:, 0]
    order = sims.argsort(descending=True).tolist()
    return [(i, float(sims[i])) for i in order]


__all__ = [
    "OBJECTIVE",
    "ClipModel",
    "ClipTrainConfig",
    "build_shapes_clip",
    "evaluate_shapes",
    "load_clip",
    "rank_images",
    "recall_at",
    "shapes_preprocessor",
    "shapes_tokenizer",
    "shared_caption_loss",
    "train_clip",
    "zero_shot",
]
