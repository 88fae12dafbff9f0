"""The generated shapes set: exact captions and pixels for a seed, the held-out pairs kept out
of train/test, captions that say what the pixels show."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lmarch.data.shapes import (
    COLOURS,
    HELD_OUT,
    draw_shape,
    seen_pairs,
    shapes_dataset,
    to_pixels,
)
from lmarch.errors import LmarchError


def _digest(examples) -> str:
    return hashlib.sha256(b"".join(e.image.tobytes() for e in examples)).hexdigest()[:16]


def test_seed_zero_gives_these_captions_and_pixels() -> None:
    train = shapes_dataset(4, seed=0, split="train")
    assert [e.caption for e in train] == [
        "a yellow circle below a blue triangle",
        "a blue circle below a red square",
        "a blue circle left of a yellow circle",
        "a red circle right of a yellow triangle",
    ]
    assert _digest(train) == "04782a33bab4bc89"
    single = shapes_dataset(4, seed=0, split="train", n_objects=1)
    assert [e.caption for e in single] == [
        "a blue triangle",
        "a blue circle",
        "a green square",
        "a red circle",
    ]
    assert _digest(single) == "99fb8710e40dab4c"
    held = shapes_dataset(4, seed=0, split="heldout", n_objects=1)
    assert [e.caption for e in held] == [
        "a green circle",
        "a red triangle",
        "a green circle",
        "a blue square",
    ]
    assert _digest(held) == "2bd788192675abf3"
    # the same arguments give the same set; another seed another one
    assert _digest(shapes_dataset(4, seed=0, split="train")) == _digest(train)
    assert _digest(shapes_dataset(4, seed=1, split="train")) != _digest(train)


def test_small_image_pixel_for_pixel() -> None:
    """seed 0 at 16 pixels: a blue triangle in the top half, a yellow circle in the bottom."""
    (ex,) = shapes_dataset(1, seed=0, split="train", image_size=16)
    assert ex.caption == "a yellow circle below a blue triangle"
    mask = (ex.image.sum(-1) > 0).astype(int)
    rows = ["".join(map(str, r)) for r in mask]
    assert rows[1:5] == [
        "0000000000010000",
        "0000000000011000",
        "0000000000111000",
        "0000000000111100",
    ]
    assert rows[11:16] == [
        "0000000001100000",
        "0000000011110000",
        "0000000011110000",
        "0000000011110000",
        "0000000001100000",
    ]
    assert all(r == "0" * 16 for r in rows[5:11]) and rows[0] == "0" * 16
    assert tuple(ex.image[4, 12]) == COLOURS["blue"] and tuple(ex.image[13, 9]) == COLOURS["yellow"]


def test_held_out_pairs_only_in_the_heldout_split() -> None:
    for split in ("train", "test"):
        for ex in shapes_dataset(300, seed=3, split=split):
            assert not set(ex.objects) & set(HELD_OUT)
    for ex in shapes_dataset(100, seed=3, split="heldout"):
        assert set(ex.objects) & set(HELD_OUT)
    # each colour and each shape is still seen in training, with other partners
    assert {c for c, _ in seen_pairs()} == set(COLOURS)
    assert {s for _, s in seen_pairs()} == {"circle", "square", "triangle"}
    train = {p for ex in shapes_dataset(300, seed=3, n_objects=1) for p in ex.objects}
    assert train == set(seen_pairs())


def test_captions_say_what_the_pixels_show() -> None:
    """Each object's colour is in its half of the image, and nowhere in the other half."""
    halves = {"above": (0, 1), "below": (1, 0), "left of": (2, 3), "right of": (3, 2)}
    for ex in shapes_dataset(60, seed=5):
        img, n = ex.image, ex.image.shape[0] // 2
        parts = [img[:n], img[n:], img[:, :n], img[:, n:]]
        first, second = halves[ex.relation]
        for (colour, _), where in zip(ex.objects, (first, second)):
            assert (parts[where] == COLOURS[colour]).all(-1).any(), ex.caption
        if ex.objects[0][0] != ex.objects[1][0]:
            assert not (parts[second] == COLOURS[ex.objects[0][0]]).all(-1).any()


def test_shapes_area_and_pixels_range() -> None:
    """Disc area ~ pi r^2, square (1.7 r)^2, triangle 2 r^2 (within 5 % at r = 20)."""
    for shape, area in (("circle", np.pi * 400), ("square", (1.7 * 20) ** 2), ("triangle", 800)):
        img = np.zeros((64, 64, 3), np.uint8)
        draw_shape(img, shape, 32, 32, 20, (1, 2, 3))
        assert abs((img[..., 0] == 1).sum() - area) / area < 0.05
    x = to_pixels(shapes_dataset(2, seed=0))
    assert x.shape == (2, 3, 32, 32) and x.min() == -1.0 and x.max() <= 1.0


def test_bad_arguments_are_one_error() -> None:
    with pytest.raises(LmarchError, match="unknown split 'dev'"):
        shapes_dataset(1, split="dev")
    with pytest.raises(LmarchError, match="n_objects must be 1 or 2"):
        shapes_dataset(1, n_objects=3)
    with pytest.raises(LmarchError, match="unknown shape 'star'"):
        draw_shape(np.zeros((8, 8, 3), np.uint8), "star", 4, 4, 2, (1, 1, 1))
