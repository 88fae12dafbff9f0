"""A generated image-caption set: coloured shapes in positions, with captions.

    "a red circle above a blue square"        two objects and where the first one is
    "a green triangle"                        one object

Every image is drawn from a seed with Python's ``random.Random`` (whose ``random()`` stream is
the same on every platform and version), so a seed gives the same pixels and captions anywhere
and nothing is downloaded. Shapes are rasterised at pixel centres: a disc, an axis-aligned
square and an upward triangle, each of one flat colour on a black background, with the size
and position jittered inside the object's half of the image.

For compositional tests some colour-shape pairs never occur in the ``train`` and ``test``
splits (:data:`HELD_OUT`: each colour and each shape is still seen, with other partners);
the ``heldout`` split holds images in which at least one object is such a pair. A model that
names "red triangle" on held-out images has put together "red" and "triangle" from separate
examples (the question of Lake & Baroni 2018, for images and text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lmarch.errors import LmarchError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
)
SPLITS = ("train", "test", "heldout")
# split -> the seed offset that keeps its images apart from the other splits' for one seed
_SPLIT_SEED = {"train": 0, "test": 1_000_003, "heldout": 2_000_003}


@dataclass(frozen=True)
class ShapeExample:
    """One image ([H, W, 3] uint8), its caption, its objects as (colour, shape) pairs in
    caption order, and the relation of the first to the second (None for one object)."""

    image: np.ndarray
    caption: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None


def all_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, colours first."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def seen_pairs() -> list[tuple[str, str]]:
    """The pairs of the ``train`` and ``test`` splits (all but :data:`HELD_OUT`)."""
    return [p for p in all_pairs() if p not in HELD_OUT]


def describe(pair: tuple[str, str]) -> str:
    """'a red circle'."""
    return f"a {pair[0]} {pair[1]}"


def caption_of(objects: tuple[tuple[str, str], ...], relation: str | None) -> str:
    """'a red circle above a blue square' (or 'a red circle' for one object)."""
    if len(objects) == 1:
        return describe(objects[0])
    return f"{describe(objects[0])} {relation} {describe(objects[1])}"


def draw_shape(image: np.ndarray, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    """Paint ``shape`` of half-size ``r`` centred at (cx, cy) in pixel units, in place: a
    disc of radius r, a square of side 1.7 r, or an upward triangle of height and base 2 r."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    x, y = xs + 0.5 - cx, ys + 0.5 - cy  # pixel centres relative to the shape's centre
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    elif shape == "triangle":
        # apex at the top (y = -r), base at y = r; half-width grows from 0 to r going down
        inside = (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    else:
        raise LmarchError(f"unknown shape {shape!r}", hint=f"one of {SHAPES}")
    image[inside] = rgb


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _choice(rng: random.Random, items):
    return items[int(rng.random() * len(items))]


def _place(rng: random.Random, size: int, box: tuple[float, float, float, float]):
    """A centre and half-size for a shape inside box (x0, y0, x1, y1), in pixels."""
    x0, y0, x1, y1 = box
    room = min(x1 - x0, y1 - y0) / 2
    r = _uniform(rng, 0.55, 0.8) * room
    return _uniform(rng, x0 + r, x1 - r), _uniform(rng, y0 + r, y1 - r), r


def _boxes(relation: str, size: int):
    """The halves the first and second object are drawn in, for ``relation``."""
    s, half = float(size), size / 2
    top, bottom = (0.0, 0.0, s, half), (0.0, half, s, s)
    left, right = (0.0, 0.0, half, s), (half, 0.0, s, s)
    return {"above": (top, bottom), "below": (bottom, top), "left of": (left, right),
            "right of": (right, left)}[relation]  # fmt: skip


def _objects(rng: random.Random, split: str, n_objects: int) -> tuple[tuple[str, str], ...]:
    seen, held = seen_pairs(), list(HELD_OUT)
    if n_objects == 1:
        return (_choice(rng, held if split == "heldout" else seen),)
    if split != "heldout":
        first = _choice(rng, seen)
        second = _choice(rng, [p for p in seen if p != first])
        return first, second
    novel = _choice(rng, held)
    other = _choice(rng, [p for p in all_pairs() if p != novel])
    return (novel, other) if rng.random() < 0.5 else (other, novel)


def make_example(rng: random.Random, split: str, n_objects: int, size: int) -> ShapeExample:
    """One image and caption drawn with ``rng``."""
    objects = _objects(rng, split, n_objects)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    if n_objects == 1:
        cx, cy, r = _place(rng, size, (0.0, 0.0, float(size), float(size)))
        draw_shape(image, objects[0][1], cx, cy, r, COLOURS[objects[0][0]])
        return ShapeExample(image, caption_of(objects, None), objects, None)
    relation = _choice(rng, RELATIONS)
    for (colour, shape), box in zip(objects, _boxes(relation, size)):
        cx, cy, r = _place(rng, size, box)
        draw_shape(image, shape, cx, cy, r, COLOURS[colour])
    return ShapeExample(image, caption_of(objects, relation), objects, relation)


def shapes_dataset(
    n: int, seed: int = 0, split: str = "train", n_objects: int = 2, image_size: int = 32
) -> list[ShapeExample]:
    """``n`` examples of ``split`` (``train``, ``test`` or ``heldout``), the same for the same
    arguments; the splits draw from different streams of one seed."""
    if split not in SPLITS:
        raise LmarchError(f"unknown split {split!r}", hint=f"one of {', '.join(SPLITS)}")
    if n_objects not in (1, 2):
        raise LmarchError(f"n_objects must be 1 or 2, got {n_objects}")
    if image_size < 8:
        raise LmarchError(f"image_size must be at least 8 pixels, got {image_size}")
    rng = random.Random(seed * 7_919 + _SPLIT_SEED[split] + 101 * n_objects)
    return [make_example(rng, split, n_objects, image_size) for _ in range(n)]


QUESTION_WORDS = ("what", "colour", "shape", "is", "the", "one")


def questions(example: ShapeExample) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs about ``example``'s scene, only where the answer is
    unique: "what colour is the circle?" for each shape drawn once ("red"), and "what shape is
    the red one?" for each colour drawn once ("circle")."""
    shapes = [s for _, s in example.objects]
    colours = [c for c, _ in example.objects]
    pairs = [(f"what colour is the {s}?", c) for c, s in example.objects if shapes.count(s) == 1]
    pairs += [
        (f"what shape is the {c} one?", s) for c, s in example.objects if colours.count(c) == 1
    ]
    return pairs


def to_pixels(examples: list[ShapeExample]) -> Tensor:
    """Images as float pixels [B, 3, H, W], each channel mapped from 0..255 to -1..1."""
    array = np.stack([e.image for e in examples]).astype(np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


__all__ = [
    "COLOURS",
    "HELD_OUT",
    "QUESTION_WORDS",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "ShapeExample",
    "all_pairs",
    "caption_of",
    "describe",
    "draw_shape",
    "make_example",
    "questions",
    "seen_pairs",
    "shapes_dataset",
    "to_pixels",
]
