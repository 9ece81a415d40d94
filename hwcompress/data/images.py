"""A folder of images as model inputs, with the preprocessing the model was trained with.

A spec is ``key=value`` pairs separated by commas, or a preset name, optionally followed by
overrides (``torch,resize=232``):

- ``resize=N``: shorter side to N pixels (bilinear); default: the crop size
- ``crop=N`` or ``crop=HxW``: centre crop; default: the model input's height x width
- ``scale=S``: divide pixel values (0..255) by S first (1 keeps 0..255)
- ``mean=a:b:c``, ``std=a:b:c``: per channel, in the scaled range, in the channel order below
- ``order=rgb|bgr``, ``layout=nchw|nhwc``

Presets: ``torch`` (resize 256, RGB/255, ImageNet mean/std, NCHW), ``caffe`` (resize 256, BGR
0..255 minus (104, 117, 123), NCHW), ``mnist`` (grey 0..1, NCHW).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .datasets import IMAGENET_MEAN_BGR, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from ..errors import HwcError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocessing:
    resize: int | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1.0
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    order: str = "rgb"  # or "bgr"; "grey" for one channel
    layout: str = "nchw"


PRESETS = {  # the conventions ``datasets.imagenet_samples`` applies, for image files
    "torch": Preprocessing(resize=256, scale=255.0, mean=tuple(map(float, IMAGENET_MEAN_RGB)),
                           std=tuple(map(float, IMAGENET_STD_RGB))),
    "caffe": Preprocessing(resize=256, mean=tuple(map(float, IMAGENET_MEAN_BGR)), order="bgr"),
    "mnist": Preprocessing(scale=255.0, order="grey"),
}


def parse_preprocessing(text: str) -> Preprocessing:
    """``torch``, ``caffe,resize=224`` or ``resize=256,crop=224,scale=255,mean=...``; one-line errors."""
    spec = Preprocessing()
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "=" not in part:
            if part not in PRESETS:
                raise HwcError(f"preprocessing {text!r}: unknown preset {part!r} (presets: {', '.join(PRESETS)})")
            spec = PRESETS[part]
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            if key == "resize":
                spec = replace(spec, resize=int(value))
            elif key == "crop":
                h, _, w = value.partition("x")
                spec = replace(spec, crop=(int(h), int(w or h)))
            elif key == "scale":
                spec = replace(spec, scale=float(value))
            elif key in ("mean", "std"):
                spec = replace(spec, **{key: tuple(float(v) for v in value.split(":"))})
            elif key == "order" and value in ("rgb", "bgr", "grey"):
                spec = replace(spec, order=value)
            elif key == "layout" and value in ("nchw", "nhwc"):
                spec = replace(spec, layout=value)
            else:
                raise ValueError(f"unknown key or value {part!r}")
        except ValueError as exc:
            raise HwcError(f"preprocessing {text!r}: {exc} (keys: resize, crop, scale, mean, std, "
                           f"order=rgb|bgr|grey, layout=nchw|nhwc)") from exc
    if spec.std and any(s == 0 for s in spec.std):
        raise HwcError(f"preprocessing {text!r}: std has a zero")
    return spec


def load_image_folder(folder: Path, spec: Preprocessing, input_name: str, input_shape: list[int],
                      max_samples: int) -> np.ndarray:
    """Up to ``max_samples`` images of ``folder`` (sorted by name) as one float32 array [S, *shape[1:]]."""
    from PIL import Image, UnidentifiedImageError

    if len(input_shape) != 4:
        raise HwcError(f"image calibration data needs a 4-D image input; {input_name!r} has shape {input_shape}")
    channels, height, width = ((input_shape[1], input_shape[2], input_shape[3]) if spec.layout == "nchw"
                               else (input_shape[3], input_shape[1], input_shape[2]))
    want = 1 if spec.order == "grey" else 3
    if channels != want:
        raise HwcError(f"preprocessing gives {want} channel(s) ({spec.order}, {spec.layout}) but input "
                       f"{input_name!r} has shape {input_shape}")
    crop = spec.crop or (height, width)
    if crop != (height, width):
        raise HwcError(f"preprocessing crops to {crop[0]}x{crop[1]} but input {input_name!r} takes "
                       f"{height}x{width} (shape {input_shape})")
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        if values and len(values) != channels:
            raise HwcError(f"preprocessing {name} has {len(values)} values for {channels} channel(s) of {input_name!r}")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_samples]
    if not files:
        raise HwcError(f"calibration folder {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    batch = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if spec.order == "grey" else "RGB")
                batch.append(_prepare(image, spec, crop))
        except (UnidentifiedImageError, OSError) as exc:
            raise HwcError(f"calibration folder {folder}: {path.name} is not a readable image ({exc})") from exc
        except Image.DecompressionBombError as exc:
            raise HwcError(f"calibration folder {folder}: {path.name} is too large to decode "
                           f"({first_line(exc)})") from exc
    return np.stack(batch).astype(np.float32)


def _prepare(image, spec: Preprocessing, crop: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resize = spec.resize or max(crop)
    w, h = image.size
    if min(w, h) != resize:
        ratio = resize / min(w, h)
        image = image.resize((max(crop[1], round(w * ratio)), max(crop[0], round(h * ratio))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - crop[1]) // 2, (h - crop[0]) // 2
    pixels = np.asarray(image.crop((left, top, left + crop[1], top + crop[0])), dtype=np.float32)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if spec.order == "bgr":
        pixels = pixels[..., ::-1]
    pixels = pixels / spec.scale
    if spec.mean:
        pixels = pixels - np.asarray(spec.mean, np.float32)
    if spec.std:
        pixels = pixels / np.asarray(spec.std, np.float32)
    return pixels.transpose(2, 0, 1) if spec.layout == "nchw" else pixels
