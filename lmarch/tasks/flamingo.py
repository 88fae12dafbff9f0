"""Visual question answering with a Flamingo-style adapter on the generated shapes.

Three stages, as in Alayrac et al. 2022 (a contrastively pretrained vision encoder and a
text-pretrained LM, both frozen; only the new layers learn):

0. a small CLIP (:mod:`lmarch.tasks.clip`) learns the shapes' images and captions; its image
   tower is frozen (or the tower of an existing ``lmarch clip train`` run is used);
1. a small GPT learns the text alone: sequences "what colour is the circle? red" for random
   scenes (and the scenes' captions), so it knows the question format and which words answer
   it, but cannot know which colour a given image holds; it is then frozen;
2. :func:`lmarch.peft.flamingo.add_flamingo` puts gated cross-attention layers in front of the
   GPT's blocks; they and the perceiver resampler learn to answer from the image, with the LM
   loss on the answer word only.

The answer is the LM's greedy next token after the question. Accuracy is reported next to three
baselines on the same questions: chance (1/4 for a colour, 1/3 for a shape, averaged over the
questions), the most frequent answer of each question kind, and the frozen LM without the image
(the adapted model at initialisation, whose gates are closed).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmarch.data.images import ImagePreprocessor
from lmarch.data.shapes import (
    COLOURS,
    QUESTION_WORDS,
    SHAPES,
    ShapeExample,
    questions,
    shapes_dataset,
    to_pixels,
)
from lmarch.errors import LmarchError
from lmarch.loading.model import FLAMINGO
from lmarch.models.gpt import GPT, GPTConfig
from lmarch.models.vit import ViT
from lmarch.peft.flamingo import FlamingoAdapter, add_flamingo

OBJECTIVE = FLAMINGO
IGNORE_INDEX = -100
GATE_LR_SCALE = 10.0


@dataclass
class FlamingoTrainConfig:
    """Both stages' settings (defaults: a CPU-minute run)."""

    clip_steps: int = 150  # stage 0: a CLIP whose image tower is the frozen vision encoder
    lm_steps: int = 200  # stage 1: the text-only GPT
    steps: int = 400  # stage 2: the adapter (and the ViT)
    batch_size: int = 32
    learning_rate: float = 5e-3
    n_embd: int = 64  # GPT and ViT width
    n_layer: int = 2
    n_head: int = 4
    n_latents: int = 8
    image_size: int = 32
    patch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("clip_steps", "lm_steps", "n_latents"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LmarchError(f"{name} must be a positive integer, got {value!r}")
        from lmarch.tasks.clip import check_small_vision_config  # as caption.py: on use

        check_small_vision_config(self)


@dataclass
class FlamingoQA:
    """A frozen GPT with Flamingo layers, its ViT, tokenizer and image preprocessing."""

    lm: GPT
    vision: ViT
    adapter: FlamingoAdapter
    tokenizer: Any
    preprocessor: ImagePreprocessor

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Ids [B, T] (start token, words, end token, end-token padding) and lengths [B]."""
        batch = self.tokenizer.encode_batch(list(texts), max_length=self.lm.config.block_size)
        return torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"]).sum(1)

    def logits(self, pixels: Tensor | None, ids: Tensor) -> Tensor:
        """LM logits [B, T, V] of ids, attending to the image (None: the frozen LM alone)."""
        features = None if pixels is None else self.vision(pixels).hidden
        with self.adapter.attending(features):
            return self.lm(ids)

    @torch.no_grad()
    def answer(self, pixels: Tensor | None, question_texts: Sequence[str]) -> list[str]:
        """The greedy one-token answer to each question about the image in its row."""
        ids, lengths = self.encode(question_texts)
        ids, lengths = ids[:, :-1], lengths - 1  # drop the end token: the answer comes next
        logits = self.logits(pixels, ids)
        last = logits[torch.arange(ids.shape[0]), lengths - 1].argmax(dim=-1)
        # the token's own spelling: a lone special token decodes to nothing
        return [self.tokenizer.id_to_token(t).removesuffix("</w>") for t in last.tolist()]


def qa_text(question: str, answer: str) -> str:
    """The training sequence of one question: 'what colour is the circle? red'."""
    return f"{question} {answer}"


def answer_labels(ids: Tensor, lengths: Tensor) -> Tensor:
    """Labels for ids[:, 1:]: the answer word (the token before the end token) only."""
    labels = torch.full_like(ids[:, 1:], IGNORE_INDEX)
    rows = torch.arange(ids.shape[0])
    labels[rows, lengths - 3] = ids[rows, lengths - 2]
    return labels


def _scenes(config: FlamingoTrainConfig, step: int, stream: int) -> list[ShapeExample]:
    seed = config.seed * 1_000_003 + stream * 100_003 + step
    half = config.batch_size // 2
    batch = shapes_dataset(half, seed, "train", 1, config.image_size)
    return batch + shapes_dataset(config.batch_size - half, seed, "train", 2, config.image_size)


def _pick(examples: Sequence[ShapeExample], rng: random.Random) -> list[tuple[str, str]]:
    return [rng.choice(questions(e)) for e in examples]


def _optimizer(params, config: FlamingoTrainConfig, steps: int, gates=()):
    """AdamW with one-cycle warmup and decay; ``gates`` (the tanh gates' scalars) learn
    ``GATE_LR_SCALE`` times faster, without weight decay: a gate near 0 scales the gradient of
    everything behind it, so a slow gate holds back the whole adapter on a short run."""
    ids = {id(p) for p in gates}
    groups = [{"params": [p for p in params if id(p) not in ids]}]
    peak = [config.learning_rate]
    if gates:
        groups.append({"params": list(gates), "weight_decay": 0.0})
        peak.append(config.learning_rate * GATE_LR_SCALE)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(
        optimizer, peak, total_steps=steps, pct_start=0.1
    )


def frozen_vision(
    config: FlamingoTrainConfig,
    out: Path,
    clip: str | Path | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> ViT:
    """Stage 0, the vision encoder, frozen: the image tower of the ``lmarch clip train`` run
    ``clip``, or of a CLIP trained now on the shapes (as Flamingo's NFNet was pretrained
    contrastively), written to ``out/clip``."""
    from lmarch.tasks.clip import ClipTrainConfig, load_clip, train_clip

    if clip is None:
        c = config
        clip = out / "clip"
        settings = ClipTrainConfig(
            steps=c.clip_steps, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            image_size=c.image_size, patch_size=c.patch_size, seed=c.seed,
        )  # fmt: skip
        report = None if progress is None else (lambda step, loss: progress("clip", step, loss))
        train_clip(settings, clip, progress=report)
    vision = load_clip(clip).model.vision
    return vision.requires_grad_(False).eval()


def train_flamingo(
    config: FlamingoTrainConfig,
    out: str | Path,
    progress: Callable[[str, int, float], None] | None = None,
    clip: str | Path | None = None,
) -> dict[str, Any]:
    """Stage 0 (a frozen CLIP image tower, :func:`frozen_vision`), stage 1 (a text-only GPT),
    then stage 2 (the GPT frozen, Flamingo layers trained); writes the run folder ``out`` (the
    GPT as an ordinary run, ``adapter.safetensors`` with the vision tower and adapter beside
    it)."""
    from lmarch.models.registry import config_to_dict
    from lmarch.tasks.clip import shapes_preprocessor, shapes_tokenizer
    from lmarch.weights.model_folder import write_model_folder
    from lmarch.weights.safetensors_io import save_tensors

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    c = config
    tokenizer = shapes_tokenizer(QUESTION_WORDS)
    lm = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=12, n_layer=c.n_layer,
                       n_head=c.n_head, n_embd=c.n_embd))  # fmt: skip
    start = time.perf_counter()
    vision = frozen_vision(c, Path(out), clip, progress)
    # stage 1: the LM reads questions with answers (and captions), no images
    optimizer, schedule = _optimizer(lm.parameters(), c, c.lm_steps)
    probe = FlamingoQA(lm, vision, None, tokenizer, shapes_preprocessor(c.image_size))  # type: ignore[arg-type]
    lm_losses = []
    for step in range(c.lm_steps):
        scenes = _scenes(c, step, 1)
        texts = [qa_text(q, a) for q, a in _pick(scenes, rng)] + [e.caption for e in scenes]
        ids, lengths = probe.encode(texts)
        labels = ids[:, 1:].masked_fill(torch.arange(1, ids.shape[1]) >= lengths[:, None], -100)
        loss = F.cross_entropy(lm(ids[:, :-1]).flatten(0, 1), labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        lm_losses.append(loss.item())
        if progress is not None:
            progress("lm", step + 1, loss.item())
    lm.eval()
    write_model_folder(out, lm, tokenizer, {"model": config_to_dict(lm.config), "objective": "clm"})
    # stage 2: freeze the LM, add the adapter, train it on the answer word
    adapter = add_flamingo(lm, vision.config.n_embd, n_latents=c.n_latents, n_head=c.n_head)
    run = FlamingoQA(lm, vision, adapter, tokenizer, probe.preprocessor)
    trainable = list(adapter.parameters())
    gates = [p for x in adapter.xattn for p in (x.attn_gate, x.ffn_gate)]
    optimizer, schedule = _optimizer(trainable, c, c.steps, gates)
    adapter.train()
    losses = []
    for step in range(c.steps):
        scenes = _scenes(c, step, 2)
        ids, lengths = run.encode([qa_text(q, a) for q, a in _pick(scenes, rng)])
        logits = run.logits(to_pixels(scenes), ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), answer_labels(ids, lengths).flatten())
        if not torch.isfinite(loss):
            raise LmarchError(f"the loss is {loss.item()} at step {step}", hint="lower the rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress("adapter", step + 1, loss.item())
    adapter.eval()
    tensors = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    tensors |= {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, Path(out) / "adapter.safetensors")
    _update_config(Path(out), {"objective": OBJECTIVE, "flamingo": asdict(config),
                               "vision": asdict(vision.config),
                               "image": asdict(run.preprocessor)})  # fmt: skip
    return {
        "out": str(out), "train_s": time.perf_counter() - start,
        "lm_loss_last": sum(lm_losses[-10:]) / len(lm_losses[-10:]),
        "loss_first": sum(losses[:10]) / len(losses[:10]),
        "loss_last": sum(losses[-10:]) / len(losses[-10:]), "gates": adapter.gates(),
    }  # fmt: skip


def _update_config(folder: Path, values: dict[str, Any]) -> None:
    from lmarch.weights.checkpoint import read_json, write_json

    write_json(folder / "config.json", {**read_json(folder / "config.json"), **values})


def load_flamingo(spec: str | Path) -> FlamingoQA:
    """The model of a ``lmarch flamingo train`` run folder, read by :func:`lmarch.load`."""
    from lmarch.loading import load

    loaded = load(spec, quant="none").require("flamingo", "lmarch flamingo")
    m = loaded.model
    return FlamingoQA(m.lm, m.vision, m.adapter, loaded.tokenizer, loaded.preprocessor)


def qa_examples(
    split: str, n: int, image_size: int, seed: int = 0
) -> tuple[list[tuple[int, str, str]], list[ShapeExample]]:
    """(image index, question, answer) triples over ``n`` images of ``split`` (half with one
    object, half with two), every question each image allows, and the images."""
    half = n // 2
    images = shapes_dataset(half, seed, split, 1, image_size)
    images += shapes_dataset(n - half, seed, split, 2, image_size)
    return [(i, q, a) for i, e in enumerate(images) for q, a in questions(e)], images


def evaluate_flamingo(run: FlamingoQA, split: str = "test", n: int = 200) -> dict[str, Any]:
    """Answer accuracy on ``split`` with the image, without it (the frozen LM), the chance
    level and the most-frequent-answer-per-kind baseline, on the same questions."""
    if split not in ("test", "heldout"):
        raise LmarchError(f"unknown split {split!r}", hint="test or heldout")
    if n < 2:
        raise LmarchError(f"evaluate at least 2 images, got {n}")
    triples, images = qa_examples(split, n, run.vision.config.image_size)
    pixels = to_pixels(images)[[i for i, _, _ in triples]]
    texts = [q for _, q, _ in triples]
    truth = [a for _, _, a in triples]
    kinds = ["colour" if "colour" in q else "shape" for q in texts]
    seen = run.answer(pixels, texts)
    blind = run.answer(None, texts)
    common = {k: Counter(a for a, kk in zip(truth, kinds) if kk == k) for k in set(kinds)}
    majority = sum(common[k].most_common(1)[0][1] for k in common) / len(truth)
    chance = sum(1 / len(COLOURS) if k == "colour" else 1 / len(SHAPES) for k in kinds)

    def accuracy(answers: list[str]) -> float:
        return sum(a == t for a, t in zip(answers, truth)) / len(truth)

    return {
        "split": split, "images": n, "questions": len(truth), "accuracy": accuracy(seen),
        "accuracy_colour": _kind_accuracy(seen, truth, kinds, "colour"),
        "accuracy_shape": _kind_accuracy(seen, truth, kinds, "shape"),
        "blind_accuracy": accuracy(blind), "chance": chance / len(truth),
        "majority_accuracy": majority,
        "examples": [{"question": q, "answer": a, "truth": t}
                     for q, a, t in list(zip(texts, seen, truth))[:6]],
    }  # fmt: skip


def _kind_accuracy(answers: list[str], truth: list[str], kinds: list[str], kind: str) -> float:
    rows = [(a, t) for a, t, k in zip(answers, truth, kinds) if k == kind]
    return sum(a == t for a, t in rows) / max(len(rows), 1)


__all__ = [
    "OBJECTIVE",
    "FlamingoQA",
    "FlamingoTrainConfig",
    "answer_labels",
    "evaluate_flamingo",
    "load_flamingo",
    "qa_examples",
    "qa_text",
    "train_flamingo",
]
