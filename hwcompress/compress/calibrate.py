"""Calibration for quantization: activation ranges from running the float model on calibration data
(minmax, percentile, entropy), and the signal-to-quantization-noise of tensors, both with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import HwcError
from ..model import reference as ort
from ..model.graph import Graph
from ..passes.quantize import ActivationStats, quantizable_layers


def calibrate(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], method: str = "percentile",
              percentile: float = 99.99, max_samples: int = 200_000, seed: int = 0) -> dict[str, ActivationStats]:
    """Ranges of every quantizable layer's input tensor over the calibration feeds."""
    if method not in ("minmax", "percentile", "entropy"):
        raise HwcError(f"unknown calibration method {method!r}; use minmax, percentile or entropy")
    if not feeds:
        raise HwcError("calibration needs at least one sample")
    graph = Graph(model)
    tensors = sorted({n.input[0] for n in quantizable_layers(graph)})
    rng = np.random.default_rng(seed)
    lows, highs, sums, counts, samples = {}, {}, {}, {}, {t: [] for t in tensors}
    per_run = max(1000, max_samples // len(feeds))
    for values in ort.run_with_intermediates(model, feeds, tensors):
        for t in tensors:
            v = values[t].astype(np.float64)
            lows[t] = min(lows.get(t, np.inf), float(v.min()))
            highs[t] = max(highs.get(t, -np.inf), float(v.max()))
            axes = tuple(i for i in range(v.ndim) if i != (1 if v.ndim > 2 else v.ndim - 1))
            sums[t] = sums.get(t, 0) + v.sum(axis=axes)
            counts[t] = counts.get(t, 0) + v.size // v.shape[1 if v.ndim > 2 else -1]
            flat = v.reshape(-1)
            samples[t].append(flat if flat.size <= per_run else rng.choice(flat, per_run, replace=False))
    stats = {}
    for t in tensors:
        data = np.concatenate(samples[t])
        low, high = lows[t], highs[t]
        if method == "percentile":
            bound = float(np.percentile(np.abs(data), percentile))
            low, high = max(low, -bound), min(high, bound)
        elif method == "entropy":
            bound = entropy_threshold(np.abs(data), 128 if low < 0 else 256)
            low, high = max(low, -bound), min(high, bound)
        stats[t] = ActivationStats(low, high, sums[t] / counts[t])
    return stats


def entropy_threshold(values: np.ndarray, levels: int, bins: int = 2048) -> float:
    """The |x| clipping threshold whose ``levels``-level quantized histogram is closest (KL) to the data."""
    values = values[values > 0]  # exact zeros (ReLU) are exactly representable: they would skew the search
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return 1e-8
    hist, edges = np.histogram(values, bins=bins, range=(0, top))
    hist = hist.astype(np.float64)
    best, best_kl = top, np.inf
    for stop in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        p = hist[:stop].copy()
        p[stop - 1] += hist[stop:].sum()          # clipped mass lands in the last bin
        q = _spread_over_levels(hist[:stop], levels)  # the reference without its clipped tail
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        mask = p > 0
        kl = float(np.sum(p[mask] / p_sum * np.log((p[mask] / p_sum) / np.maximum(q[mask] / q_sum, 1e-12))))
        if kl < best_kl:
            best_kl, best = kl, float(edges[stop])
    return best


def _spread_over_levels(hist: np.ndarray, levels: int) -> np.ndarray:
    """``hist`` merged into ``levels`` runs of adjacent bins (``np.array_split``'s runs), each
    run's mass spread evenly over its non-empty bins: what the histogram looks like quantized."""
    size, longer = divmod(hist.size, levels)
    sizes = np.full(levels, size)
    sizes[:longer] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    filled = hist > 0
    mass = np.add.reduceat(hist, starts) / np.maximum(np.add.reduceat(filled.astype(np.float64), starts), 1)
    return np.where(filled, np.repeat(mass, sizes), 0.0)


def tensor_sqnr(reference: onnx.ModelProto, quantized: onnx.ModelProto, tensors: list[str],
                feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Signal-to-quantization-noise (dB) of tensors present in both models, over the feeds."""
    names = sorted(set(tensors))
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for ref, got in zip(ort.run_with_intermediates(reference, feeds, names),
                        ort.run_with_intermediates(quantized, feeds, names)):
        for name in names:
            r = ref[name].astype(np.float64)
            signal[name] += float(np.sum(r ** 2))
            noise[name] += float(np.sum((r - got[name]) ** 2))
    return {n: 10 * np.log10(max(signal[n], 1e-30) / max(noise[n], 1e-30)) for n in names}


def layer_sqnr(reference: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[str],
               feeds: list[dict[str, np.ndarray]], side: str = "output") -> dict[str, float]:
    """SQNR (dB) of each layer's output (or, with ``side="input"``, of the float tensor it reads,
    before its QuantizeLinear), quantized vs float model."""
    graph = Graph(reference)
    tensor = {name: graph.node(name).output[0] if side == "output" else graph.node(name).input[0]
              for name in layers}
    db = tensor_sqnr(reference, quantized, list(tensor.values()), feeds)
    return {name: db[t] for name, t in tensor.items()}
