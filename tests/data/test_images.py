"""CLIP preprocessing equals transformers' ``CLIPImageProcessor`` (its Pillow backend, the one
installed here) pixel for pixel on the photographs scikit-image ships."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from lmarch.data.images import ImagePreprocessor, load_image, shortest_side_size, skimage_photo
from lmarch.errors import LmarchError

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "logo.png"]


def _reference(**kwargs):
    return transformers.CLIPImageProcessor(**kwargs)


SMALL = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}


@pytest.mark.parametrize(
    ("settings", "photos"), [({}, ["astronaut.png", "camera.png", "logo.png"]), (SMALL, PHOTOS)]
)
def test_pixels_equal_clip_image_processor(settings, photos) -> None:
    """Default (224) and small settings on RGB, grey (camera) and RGBA (logo) photographs:
    max abs difference 0 (tolerance stated: exact)."""
    theirs = _reference(**settings)
    ours = ImagePreprocessor.from_hf_config(theirs.to_dict())
    images = [load_image(skimage_photo(name)) for name in photos]
    ref = theirs(images=images, return_tensors="np")["pixel_values"]
    got = ours(images).numpy()
    assert got.shape == ref.shape == (len(photos), 3, ours.crop, ours.crop)
    assert got.dtype == np.float32
    assert np.array_equal(got, ref)


def test_crop_larger_than_resize_pads_like_the_reference() -> None:
    theirs = _reference(size={"shortest_edge": 20}, crop_size={"height": 25, "width": 25})
    ours = ImagePreprocessor.from_hf_config(theirs.to_dict())
    image = load_image(skimage_photo("coffee.png"))
    ref = theirs(images=[image], return_tensors="np")["pixel_values"]
    assert np.array_equal(ours([image]).numpy(), ref)


def test_shortest_side_and_config_round_trip(tmp_path) -> None:
    assert shortest_side_size(512, 512, 224) == (224, 224)
    assert shortest_side_size(400, 600, 224) == (224, 336)  # coffee: 400 x 600
    assert shortest_side_size(300, 451, 224) == (224, 336)
    assert shortest_side_size(451, 300, 224) == (336, 224)
    prep = ImagePreprocessor(size=64, crop=48)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(prep.to_hf_config()))
    assert ImagePreprocessor.from_hf_folder(tmp_path) == prep
    assert ImagePreprocessor.from_hf_folder(tmp_path / "nothing") == ImagePreprocessor()


def test_bad_inputs_are_one_error(tmp_path) -> None:
    with pytest.raises(LmarchError, match="no image at"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(LmarchError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(LmarchError, match="shortest_edge"):
        ImagePreprocessor.from_hf_config({"size": {"height": 224, "width": 224}})
    with pytest.raises(LmarchError, match="scikit-image ships no"):
        skimage_photo("unicorn.png")
