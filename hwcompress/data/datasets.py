"""Readers for the labelled data sets used to score models (MNIST IDX files, ImageNet sample .npz).

Each returns model-ready float32 NCHW batches and integer labels, with the preprocessing that the
model it is meant for expects (see ../shared/README.md for where these conventions come from).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGENET_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def mnist(folder: str | Path, count: int | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images as [N, 1, 28, 28] floats in 0..1 (white digit on black) and labels."""
    folder = Path(folder)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    end = None if count is None else offset + count
    return images[offset:end].astype(np.float32) / 255.0, labels[offset:end].astype(np.int64)


def imagenet_samples(path: str | Path, preprocessing: str) -> tuple[np.ndarray, np.ndarray]:
    """The 224x224 ImageNet samples, preprocessed for ``caffe`` (BGR, 0..255 minus mean) or
    ``torch`` (RGB / 255, mean/std normalized) models, as [N, 3, 224, 224] and labels."""
    with np.load(path) as data:
        rgb = data["x"].astype(np.float32)
        labels = data["y"].astype(np.int64)
    if preprocessing == "caffe":
        images = rgb[..., ::-1] - IMAGENET_MEAN_BGR
    elif preprocessing == "torch":
        images = (rgb / 255.0 - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB
    else:
        raise ValueError(f"unknown preprocessing {preprocessing!r}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of logits/probabilities [N, classes, ...] against labels."""
    return float((outputs.reshape(len(outputs), -1).argmax(1) == labels).mean() * 100.0)
