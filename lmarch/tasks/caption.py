"""Captioning as a task: train a BLIP-style captioner on the generated shapes, caption images,
score captions.

Training (Li et al. 2022, sec. 3.2) sums two losses on each batch of images and captions:

- LM: cross-entropy of each caption token given the earlier ones and the image;
- ITM: a match / no-match classifier over image-caption pairs: every true pair, and for each
  image a hard negative caption (and for each caption a hard negative image) drawn from the
  batch, with probability growing with how many word positions it shares with the true caption
  (exp(shared)): "a red circle above a blue square" is a likelier negative for "a red
  circle below a blue square" than "a green triangle" is. BLIP draws its hard negatives by ITC
  similarity; position overlap is the shapes set's stand-in.

Captions are decoded greedily (:func:`lmarch.generation.seq2seq.greedy_decode`). Scores: exact
match and corpus BLEU (sacrebleu) against the true captions on the ``test`` split (colour-shape
pairs seen in training) and the ``heldout`` split (every image holds a pair never seen), next to
the trivial baseline that answers every image with the training set's most frequent caption.
"""

from __future__ import annotations

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
from lmarch.data.shapes import ShapeExample, shapes_dataset, to_pixels
from lmarch.errors import LmarchError
from lmarch.loading.model import CAPTION
from lmarch.models.blip import Blip, BlipConfig
from lmarch.models.vit import ViTConfig
from lmarch.tokenizers.clip_bpe import BOS, EOS

OBJECTIVE = CAPTION
IGNORE_INDEX = -100


@dataclass
class CaptionTrainConfig:
    """A captioner trained from scratch on the shapes set (defaults: a CPU-minute run)."""

    steps: int = 400
    batch_size: int = 32  # half one-object, half two-object images
    learning_rate: float = 5e-3
    min_lr: float = 1e-4
    warmup_iters: int = 30
    weight_decay: float = 0.01
    itm_weight: float = 1.0  # the ITM loss's weight next to the LM loss
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    image_size: int = 32
    patch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        from lmarch.tasks.clip import check_small_vision_config

        check_small_vision_config(self)
        if self.batch_size < 4:
            raise LmarchError("batch_size must be at least 4 (ITM draws negatives from the batch)")
        if self.itm_weight < 0:
            raise LmarchError(f"itm_weight must be >= 0, got {self.itm_weight}")


@dataclass
class Captioner:
    """A trained captioner with its tokenizer and image preprocessing."""

    model: Blip
    tokenizer: Any
    preprocessor: ImagePreprocessor

    def encode_captions(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Ids [B, T] (start token, words, end token, end-token padding) and their lengths [B]."""
        batch = self.tokenizer.encode_batch(list(captions), max_length=self.model.config.block_size)
        ids = torch.tensor(batch["input_ids"])
        return ids, torch.tensor(batch["attention_mask"]).sum(dim=1)

    @torch.no_grad()
    def caption(self, pixels: Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Greedy captions of preprocessed pixels [B, C, H, W]."""
        from lmarch.generation.seq2seq import greedy_decode

        steps = max_new_tokens or self.model.config.block_size - 1
        ids = greedy_decode(self.model.eval(), pixels, None, max_new_tokens=steps)
        eos = self.model.config.eos_token_id
        out = []
        for row in ids[:, 1:].tolist():
            row = row[: row.index(eos)] if eos in row else row
            out.append(self.tokenizer.decode(row).strip() if row else "")
        return out

    @torch.no_grad()
    def match_probability(self, pixels: Tensor, captions: Sequence[str]) -> Tensor:
        """p(match) [B] of each image with the caption in its row (the ITM head)."""
        ids, lengths = self.encode_captions(captions)
        memory = self.model.eval().encode(pixels)
        return self.model.itm_logits(memory, ids, lengths).softmax(dim=-1)[:, 1]


def build_captioner(config: CaptionTrainConfig, vocab_size: int, bos: int, eos: int) -> Blip:
    """A small BLIP for the shapes' images and captions."""
    c = config
    vision = ViTConfig(
        image_size=c.image_size, patch_size=c.patch_size, n_layer=c.n_layer, n_head=c.n_head,
        n_embd=c.n_embd, intermediate_size=2 * c.n_embd, layer_norm_eps=1e-5,
    )  # fmt: skip
    return Blip(
        BlipConfig(
            vocab_size=vocab_size,
            block_size=16,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            intermediate_size=2 * c.n_embd,
            pad_token_id=eos,
            bos_token_id=bos,
            eos_token_id=eos,
            decoder_start_token_id=bos,
            vision=vision,
        )  # fmt: skip
    )


def hard_negatives(ids: Tensor, generator: torch.Generator) -> Tensor:
    """For each row of caption ids [B, T], the index of another row with a different caption,
    drawn with probability proportional to exp(positions the two share); a row whose
    caption the whole batch shares gets a row of its own (no negative exists)."""
    shared = (ids[:, None, :] == ids[None, :, :]).sum(dim=-1).float()
    same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)
    weights = torch.exp(shared - shared.max()).masked_fill(same, 0.0)
    empty = weights.sum(dim=1) == 0
    weights[empty] = same[empty].float()
    return torch.multinomial(weights, 1, generator=generator)[:, 0]


def caption_losses(
    model: Blip, pixels: Tensor, ids: Tensor, lengths: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(LM loss, ITM loss) of one batch. One decoder pass over the true pairs gives both the
    next-token logits and the positive ITM states; a second pass scores the 2B negative pairs
    (image i with caption j, image j with caption i, j = :func:`hard_negatives`)."""
    memory = model.encode(pixels)
    h = model.hidden_states(ids, memory)
    labels = ids[:, 1:].masked_fill(
        torch.arange(1, ids.shape[1])[None, :] >= lengths[:, None], IGNORE_INDEX
    )
    lm = F.cross_entropy(model.lm_head(h[:, :-1]).flatten(0, 1), labels.flatten())
    rows = torch.arange(ids.shape[0])
    positive = model.itm_head(h[rows, lengths - 1])
    j = hard_negatives(ids, generator)
    neg_memory = torch.cat([memory, memory[j]])
    neg_ids, neg_lengths = torch.cat([ids[j], ids]), torch.cat([lengths[j], lengths])
    negative = model.itm_logits(neg_memory, neg_ids, neg_lengths)
    logits = torch.cat([positive, negative])
    targets = torch.cat([torch.ones_like(rows), torch.zeros(2 * len(rows), dtype=torch.long)])
    return lm, F.cross_entropy(logits, targets)


def _batch(config: CaptionTrainConfig, step: int) -> list[ShapeExample]:
    seed = config.seed * 1_000_003 + step
    half = config.batch_size // 2
    batch = shapes_dataset(half, seed, "train", 1, config.image_size)
    return batch + shapes_dataset(config.batch_size - half, seed, "train", 2, config.image_size)


def train_captioner(
    config: CaptionTrainConfig,
    out: str | Path,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train on fresh shapes batches (new images every step) with AdamW and warmup + cosine,
    minimising LM + itm_weight * ITM; writes a run folder to ``out``, returns a summary."""
    from lmarch.tasks.clip import shapes_preprocessor, shapes_tokenizer
    from lmarch.train.config import TrainConfig
    from lmarch.train.optim import build_optimizer, learning_rate_at
    from lmarch.weights.model_folder import write_model_folder

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = shapes_tokenizer()
    model = build_captioner(
        config, tokenizer.vocab_size, tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    )
    run = Captioner(model, tokenizer, shapes_preprocessor(config.image_size))
    schedule = TrainConfig(
        learning_rate=config.learning_rate, min_lr=config.min_lr,
        warmup_iters=min(config.warmup_iters, config.steps), max_iters=config.steps,
        weight_decay=config.weight_decay, beta2=0.98, batch_size=config.batch_size,
    )  # fmt: skip
    optimizer = build_optimizer(model, schedule)
    history: list[tuple[float, float]] = []
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        batch = _batch(config, step)
        ids, lengths = run.encode_captions([e.caption for e in batch])
        lm, itm = caption_losses(model, to_pixels(batch), ids, lengths, generator)
        loss = lm + config.itm_weight * itm
        if not torch.isfinite(loss):
            raise LmarchError(f"the loss is {loss.item()} at step {step}", hint="lower the rate")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        history.append((lm.item(), itm.item()))
        if progress is not None:
            progress(step + 1, loss.item())
    model.eval()
    seconds = time.perf_counter() - start
    run_config = {
        "model": {"family": "blip", **asdict(model.config)},
        "objective": OBJECTIVE,
        "caption_train": asdict(config),
        "image": asdict(run.preprocessor),
    }
    write_model_folder(out, model, tokenizer, run_config)
    tail = history[-10:]
    return {
        "out": str(out), "steps": config.steps, "train_s": seconds,
        "lm_first": sum(h[0] for h in history[:10]) / len(history[:10]),
        "lm_last": sum(h[0] for h in tail) / len(tail),
        "itm_last": sum(h[1] for h in tail) / len(tail),
    }  # fmt: skip


def load_captioner(spec: str | Path) -> Captioner:
    """A captioner from a ``lmarch caption train`` run folder, read by :func:`lmarch.load`."""
    from lmarch.loading import load

    loaded = load(spec, quant="none").require("captioner", "lmarch caption")
    return Captioner(loaded.model, loaded.tokenizer, loaded.preprocessor)


def caption_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match (share of identical captions) and corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    exact = sum(h == r for h, r in zip(hypotheses, references)) / len(references)
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    return {"exact_match": exact, "bleu": bleu}


def eval_examples(split: str, n: int, image_size: int, seed: int = 0) -> list[ShapeExample]:
    """``n`` images of ``split``: the first half with one object, the rest with two."""
    half = n // 2
    return shapes_dataset(half, seed, split, 1, image_size) + shapes_dataset(
        n - half, seed, split, 2, image_size
    )


def most_frequent_caption(image_size: int, n: int = 2000, seed: int = 0) -> str:
    """The commonest caption among ``n`` training images (the trivial baseline's answer)."""
    examples = eval_examples("train", n, image_size, seed + 1)
    return Counter(e.caption for e in examples).most_common(1)[0][0]


def itm_accuracy(run: Captioner, examples: Sequence[ShapeExample], seed: int = 0) -> float:
    """How often the ITM head scores an image's own caption above the caption of a random
    other image whose caption differs (p(match) compared, so the 1:2 balance of positives
    and negatives in training does not bias it); chance is 0.5."""
    g = torch.Generator().manual_seed(seed)
    captions = [e.caption for e in examples]
    wrong = []
    for caption in captions:
        others = [c for c in captions if c != caption]
        wrong.append(others[int(torch.randint(len(others), (1,), generator=g))])
    pixels = to_pixels(list(examples))
    p_true = run.match_probability(pixels, captions)
    p_wrong = run.match_probability(pixels, wrong)
    return float((p_true > p_wrong).float().mean())


def evaluate_captioner(run: Captioner, split: str = "test", n: int = 200) -> dict[str, Any]:
    """Greedy captions of ``n`` ``split`` images scored by exact match and BLEU, next to the
    most-frequent-caption baseline on the same images, and ITM accuracy (chance 0.5)."""
    if split not in ("test", "heldout"):
        raise LmarchError(f"unknown split {split!r}", hint="test or heldout")
    if n < 4:
        raise LmarchError(f"evaluate at least 4 images, got {n}")
    size = run.model.config.vision.image_size
    examples = eval_examples(split, n, size)
    references = [e.caption for e in examples]
    hypotheses = run.caption(to_pixels(examples))
    common = most_frequent_caption(size)
    baseline = caption_scores([common] * n, references)
    return {
        "split": split, "n": n, **caption_scores(hypotheses, references),
        "baseline_caption": common, "baseline_exact_match": baseline["exact_match"],
        "baseline_bleu": baseline["bleu"], "itm_accuracy": itm_accuracy(run, examples),
        "examples": [{"reference": r, "caption": h} for r, h in zip(references[:6], hypotheses)],
    }  # fmt: skip


__all__ = [
    "OBJECTIVE",
    "CaptionTrainConfig",
    "Captioner",
    "build_captioner",
    "caption_losses",
    "caption_scores",
    "eval_examples",
    "evaluate_captioner",
    "hard_negatives",
    "itm_accuracy",
    "load_captioner",
    "most_frequent_caption",
    "train_captioner",
]
