"""Images to model input, as CLIP's preprocessing does it (Radford et al. 2021).

    1. resize so the shorter side is ``size`` (bicubic; the longer side int(size * long / short))
    2. cut the central ``crop`` x ``crop`` square (zero-padded first if the image is smaller)
    3. rescale 0..255 to 0..1, then normalise each channel: (x - mean_c) / std_c

The resize is Pillow's bicubic filter, the one ``CLIPImageProcessor`` calls, and the arithmetic
follows the same steps and precisions (rescale in float64, normalise in float32), so the pixels
equal the reference's exactly. A folder's ``preprocessor_config.json`` supplies the sizes,
means and deviations (:meth:`ImagePreprocessor.from_hf_folder`).

Real photographs come with scikit-image (``skimage/data/``: astronaut, coffee, chelsea the cat,
rocket, ...), found without importing it: :func:`skimage_photo`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmarch.errors import LmarchError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's filter numbers, as preprocessor_config.json stores "resample"
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with the dev install
        raise LmarchError("reading images needs Pillow", hint="pip install pillow") from exc
    return Image


def load_image(path: str | Path) -> Any:
    """The image at ``path`` as an RGB ``PIL.Image`` (grey or RGBA converted, as CLIP's
    ``do_convert_rgb`` does); an unreadable file is one error naming it."""
    image_module = _pil()
    path = Path(path)
    if not path.is_file():
        raise LmarchError(f"no image at {path}")
    try:
        with image_module.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise LmarchError(f"cannot read image {path}: {exc}") from exc


def skimage_photo(name: str) -> Path:
    """The path of a photograph shipped by scikit-image (``astronaut.png``, ``coffee.png``,
    ``chelsea.png``, ...), found without importing the package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise LmarchError(
            "scikit-image is not installed", hint="pip install --no-deps scikit-image==0.26.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise LmarchError(f"scikit-image ships no {name}", hint=f"see {path.parent}")
    return path


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size``, keeping the aspect ratio
    (the longer side rounded down, as torchvision's Resize and CLIP's processor do)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central height x width window of an [H, W, C] array; a smaller image is first
    zero-padded to fit, its extra row or column (odd padding) at the top / left."""
    h, w = array.shape[:2]
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        top, left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded = np.zeros((new_h, new_w, *array.shape[2:]), dtype=array.dtype)
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return array[top : top + height, left : left + width]


@dataclass(frozen=True)
class ImagePreprocessor:
    """CLIP's preprocessing (defaults: OpenAI CLIP ViT-B/32's, 224 pixels)."""

    size: int = 224  # the shorter side after resizing
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        if self.resample not in _RESAMPLE.values():
            raise LmarchError(f"unknown resample filter {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise LmarchError("mean and std need three values each, std positive")

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> ImagePreprocessor:
        """The settings of a folder's ``preprocessor_config.json`` (the defaults without one)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LmarchError(f"cannot read {path}: {exc}") from exc
        return cls.from_hf_config(hf, str(path))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], where: str = "preprocessor_config.json") -> Any:
        """From a ``CLIPImageProcessor`` config dict; settings lmarch does not implement
        (a resize to fixed height and width, no RGB conversion) are refused by name."""
        size, crop = hf.get("size", 224), hf.get("crop_size", 224)
        if isinstance(size, dict):
            if set(size) != {"shortest_edge"}:
                raise LmarchError(f"{where}: size={size!r} is not supported", hint="shortest_edge")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise LmarchError(f"{where}: crop_size={crop!r} is not square")
            crop = crop.get("height")
        if hf.get("do_convert_rgb", True) is not True:
            raise LmarchError(f"{where}: do_convert_rgb=false is not supported")
        if hf.get("do_rescale", True) is not True:
            raise LmarchError(f"{where}: do_rescale=false is not supported")
        resample = hf.get("resample", 3)
        if resample not in _RESAMPLE:
            raise LmarchError(f"{where}: resample={resample!r} is not a Pillow filter")
        try:
            return cls(
                size=int(size),
                crop=int(crop),
                mean=tuple(float(x) for x in hf.get("image_mean", OPENAI_CLIP_MEAN)),
                std=tuple(float(x) for x in hf.get("image_std", OPENAI_CLIP_STD)),
                rescale_factor=float(hf.get("rescale_factor", 1 / 255)),
                resample=_RESAMPLE[resample],
                do_resize=bool(hf.get("do_resize", True)),
                do_center_crop=bool(hf.get("do_center_crop", True)),
                do_normalize=bool(hf.get("do_normalize", True)),
            )
        except (TypeError, ValueError) as exc:
            raise LmarchError(f"{where}: {exc}") from exc

    def to_hf_config(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` dict of these settings."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": self.size},
            "crop_size": {"height": self.crop, "width": self.crop},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "rescale_factor": self.rescale_factor,
            "resample": {v: k for k, v in _RESAMPLE.items()}[self.resample],
            "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop,
            "do_normalize": self.do_normalize,
            "do_rescale": True,
            "do_convert_rgb": True,
        }

    def array(self, image: Any) -> np.ndarray:
        """One image (a ``PIL.Image``, a path, or an [H, W, 3] uint8 array) -> [3, crop, crop]
        float32, steps 1-3 of the module docstring."""
        image_module = _pil()
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise LmarchError("an image array must be [H, W, 3] uint8")
            image = image_module.fromarray(image)
        else:
            image = image.convert("RGB")
        if self.do_resize:
            h, w = shortest_side_size(image.height, image.width, self.size)
            filt = getattr(image_module.Resampling, self.resample.upper())
            image = image.resize((w, h), resample=filt)
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop, self.crop)
        # the reference's precisions: rescale in float64, normalise in float32
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Any]) -> Tensor:
        """A batch of images -> pixels [B, 3, crop, crop] (all the same size only with a crop)."""
        arrays = [self.array(img) for img in images]
        if len({a.shape for a in arrays}) > 1:
            raise LmarchError("images of different sizes cannot be batched without a centre crop")
        return torch.from_numpy(np.stack(arrays))


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImagePreprocessor",
    "center_crop",
    "load_image",
    "shortest_side_size",
    "skimage_photo",
]
