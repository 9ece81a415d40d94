"""Calibration data: what pruning reconstruction, low-rank fitting and quantization learn from.

A ``.npz`` holds one array per model input (named after it; a single-input model may use any name),
with samples along the first axis: shape ``[S, *input_shape[1:]]`` for a batch-1 model. A folder of
images serves a model with one image input, read with a preprocessing spec (``images``). ``random``
asks for standard-normal data instead, and every report then says so.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import HwcError, first_line


@dataclass
class Calibration:
    feeds: list[dict[str, np.ndarray]]
    source: str          # the file, or "random"

    @property
    def is_random(self) -> bool:
        return self.source == "random"


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[list[int], np.dtype]]:
    weights = {t.name for t in model.graph.initializer}
    return {v.name: ([d.dim_value for d in v.type.tensor_type.shape.dim],
                     onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
            for v in model.graph.input if v.name not in weights}


def load_calibration(spec: str | Path, model: onnx.ModelProto, max_samples: int = 64, seed: int = 0,
                     preprocess: str | None = None) -> Calibration:
    """Read ``spec`` (an .npz path, a folder of images, or ``random``) into per-run feeds for ``model``."""
    inputs = model_inputs(model)
    if str(spec) == "random":
        rng = np.random.default_rng(seed)
        feeds = [{name: rng.standard_normal(shape).astype(dtype) for name, (shape, dtype) in inputs.items()}
                 for _ in range(min(max_samples, 16))]
        return Calibration(feeds, "random")
    path = Path(spec)
    if not path.exists():
        raise HwcError(f"calibration data {path}: no such file")
    source = str(path)
    if path.is_dir():
        arrays, source = _image_folder(path, inputs, preprocess, max_samples)
    else:
        arrays = _read_arrays(path)
    if len(inputs) == 1 and len(arrays) == 1:
        arrays = {next(iter(inputs)): next(iter(arrays.values()))}
    missing = [n for n in inputs if n not in arrays]
    if missing:
        raise HwcError(f"calibration data {path}: no array for input {missing[0]!r}; it has "
                       f"{', '.join(arrays) or 'no arrays'}")
    counts = {}
    for name, (shape, dtype) in inputs.items():
        array = arrays[name]
        if array.ndim != len(shape) or list(array.shape[1:]) != shape[1:]:
            raise HwcError(f"calibration data {path}: input {name!r} has shape {list(array.shape)}, "
                           f"expected [samples, {', '.join(map(str, shape[1:]))}]")
        if np.issubdtype(dtype, np.floating) != np.issubdtype(array.dtype, np.floating):
            raise HwcError(f"calibration data {path}: input {name!r} is {array.dtype}, the model expects "
                           f"{np.dtype(dtype).name} (preprocess the data first)")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise HwcError(f"calibration data {path}: input {name!r} holds NaN or infinite values")
        counts[name] = array.shape[0] // shape[0] if shape[0] else 0
        if array.shape[0] % shape[0]:
            raise HwcError(f"calibration data {path}: input {name!r} has {array.shape[0]} samples, "
                           f"not a multiple of the model's batch {shape[0]}")
    if len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise HwcError(f"calibration data {path}: inputs have different or zero sample counts: {counts}")
    runs = min(next(iter(counts.values())), max_samples)
    feeds = [{name: arrays[name][i * shape[0]:(i + 1) * shape[0]].astype(dtype)
              for name, (shape, dtype) in inputs.items()} for i in range(runs)]
    return Calibration(feeds, source)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """An .npz (one array per input) or an .npy (one array: for a model with one input)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise HwcError(f"calibration data {path}: not a readable .npz or .npy file ({first_line(exc)})") from exc
    if isinstance(data, np.ndarray):
        return {path.stem: data}
    try:
        with data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise HwcError(f"calibration data {path}: not a readable .npz file ({first_line(exc)})") from exc


def _image_folder(path: Path, inputs: dict, preprocess: str | None, max_samples: int) -> tuple[dict, str]:
    from .images import load_image_folder, parse_preprocessing

    if len(inputs) != 1:
        raise HwcError(f"calibration folder {path}: the model has {len(inputs)} inputs; a folder of images "
                       f"serves one image input (use an .npz with one array per input)")
    if not preprocess:
        raise HwcError(f"calibration folder {path}: say how to preprocess the images with --preprocess "
                       f"(a preset: torch, caffe, mnist; or resize=256,crop=224,scale=255,mean=a:b:c,std=a:b:c,"
                       f"order=rgb,layout=nchw)")
    name, (shape, _) = next(iter(inputs.items()))
    array = load_image_folder(path, parse_preprocessing(preprocess), name, shape, max_samples * max(shape[0], 1))
    return {name: array}, f"{path} ({len(array)} images, preprocessing {preprocess})"
