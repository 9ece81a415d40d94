"""Small numpy kernels the passes need to reason about tensors without running a model."""

from __future__ import annotations

import numpy as np


def conv_output_size(size: int, kernel: int, stride: int = 1, dilation: int = 1, pad_before: int = 0,
                     pad_after: int = 0) -> int:
    """Length of a Conv's output along one spatial axis (ONNX's formula, explicit pads)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(x: np.ndarray, weight: np.ndarray, pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1)) -> np.ndarray:
    """ONNX Conv (one image, group 1): x [C, H, W], weight [O, C, kh, kw] -> [O, Ho, Wo]."""
    c, h, w = x.shape
    kh, kw = weight.shape[2:]
    top, left, bottom, right = pads
    padded = np.zeros((c, h + top + bottom, w + left + right), dtype=np.float64)
    padded[:, top:top + h, left:left + w] = x
    ho = conv_output_size(padded.shape[1], kh, strides[0], dilations[0])
    wo = conv_output_size(padded.shape[2], kw, strides[1], dilations[1])
    out = np.zeros((weight.shape[0], ho, wo), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, i * dilations[0]: i * dilations[0] + strides[0] * (ho - 1) + 1: strides[0],
                            j * dilations[1]: j * dilations[1] + strides[1] * (wo - 1) + 1: strides[1]]
            out += np.einsum("oc,chw->ohw", weight[:, :, i, j], window)
    return out


def pool2d(x: np.ndarray, kernel, pads=(0, 0, 0, 0), strides=(1, 1), mode: str = "max",
           count_include_pad: bool = False) -> np.ndarray:
    """ONNX MaxPool/AveragePool (no ceil mode, no dilation) on x [C, H, W]."""
    c, h, w = x.shape
    kh, kw = kernel
    top, left, bottom, right = pads
    fill = -np.inf if mode == "max" else 0.0
    padded = np.full((c, h + top + bottom, w + left + right), fill, dtype=np.float64)
    padded[:, top:top + h, left:left + w] = x
    valid = np.zeros(padded.shape[1:])
    valid[top:top + h, left:left + w] = 1.0
    ho = (padded.shape[1] - kh) // strides[0] + 1
    wo = (padded.shape[2] - kw) // strides[1] + 1
    windows = [padded[:, i: i + strides[0] * (ho - 1) + 1: strides[0], j: j + strides[1] * (wo - 1) + 1: strides[1]]
               for i in range(kh) for j in range(kw)]
    if mode == "max":
        return np.max(windows, axis=0)
    counts = kh * kw if count_include_pad else sum(
        valid[i: i + strides[0] * (ho - 1) + 1: strides[0], j: j + strides[1] * (wo - 1) + 1: strides[1]]
        for i in range(kh) for j in range(kw))
    return np.sum(windows, axis=0) / counts


def conv_pads(attrs: dict, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) pads of an ONNX Conv/Pool, resolving auto_pad."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(in_hw, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return pads[0][0], pads[1][0], pads[0][1], pads[1][1]
    p = list(attrs.get("pads", [0, 0, 0, 0]))
    return p[0], p[1], p[2], p[3]
