"""Post-training quantization of Conv/Gemm/MatMul layers, written as ONNX QDQ.

- ``int8``: weights symmetric per output channel (int8 initializer + DequantizeLinear on its axis);
  the layer's input activation per tensor, asymmetric uint8 or symmetric int8 (the target says),
  with a QuantizeLinear -> DequantizeLinear pair in front of the layer. Activation ranges come from
  calibration: ``minmax``, ``percentile`` (99.99th of |x|) or ``entropy`` (the clipping threshold
  that minimizes the KL divergence between the float and the 8-bit histogram, as in TensorRT).
- ``pow2`` (log quantization): weights ``scale[o] * sign * 2^-e`` with e in 0..6 or zero (4-bit
  codes), so a multiply is a shift on hardware that supports it; stored dequantized so ONNX Runtime
  runs it, with the codes returned for the exported artifact and the layers named in the model's
  ``hwc.pow2_layers`` metadata (a cycle model prices their weights at 4 bits). Activations are int8
  as above. ``pow2_layers`` mixes the two: int8, but pow2 weights in the layers named.
- Bias correction: the expected output shift of the rounded weights, ``(W_q - W) E[x]``, is
  subtracted from the bias, with E[x] from the calibration data.
- Mixed precision: layers whose own quantization costs more than ``min_sqnr_db`` of output signal
  to noise stay fp32; ``keep_fp32`` names layers to skip outright.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .. import ort
from ..errors import HwcError
from ..graph import Graph
from .base import PassLog, model_pass
from .layers import bias_slot, bias_value, set_bias

POW2_EXPONENTS = 7  # e in 0..6: 2^0 .. 2^-6, plus zero and a sign: fits a 4-bit code


@dataclass
class ActivationStats:
    """Per-tensor range and per-channel mean of a layer input, from calibration."""

    low: float
    high: float
    channel_mean: np.ndarray


def quantizable_layers(graph: Graph) -> list[onnx.NodeProto]:
    layers = []
    for node in graph.topological_order():
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not graph.is_constant(node.input[1]):
            continue
        if node.op_type == "Gemm" and graph.attr(node, "transA", 0):
            continue
        if node.op_type == "MatMul" and graph.initializer(node.input[1]).ndim != 2:
            continue
        if graph.is_constant(node.input[0]):
            continue
        layers.append(node)
    return layers


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
    for feed in feeds:
        values = ort.run_with_intermediates(model, feed, tensors)
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
        chunks = np.array_split(hist[:stop], levels)  # the reference without its clipped tail
        q = np.concatenate([np.where(c > 0, c.sum() / max((c > 0).sum(), 1), 0.0) for c in chunks])
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        mask = p > 0
        kl = float(np.sum(p[mask] / p_sum * np.log((p[mask] / p_sum) / np.maximum(q[mask] / q_sum, 1e-12))))
        if kl < best_kl:
            best_kl, best = kl, float(edges[stop])
    return best


def activation_params(stats: ActivationStats, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (uint8 asymmetric, or int8 symmetric) for a range."""
    low, high = min(stats.low, 0.0), max(stats.high, 0.0)
    if symmetric:
        scale = max(abs(low), abs(high)) / 127.0 or 1.0
        return np.array(scale, np.float32), np.array(0, np.int8)
    scale = (high - low) / 255.0 or 1.0
    zero = int(np.clip(round(-low / scale), 0, 255))
    return np.array(scale, np.float32), np.array(zero, np.uint8)


def weight_axis(graph: Graph, node: onnx.NodeProto) -> int:
    """The output-channel axis of the layer's weight."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and graph.attr(node, "transB", 0)):
        return 0
    return 1


def quantize_weight_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = np.abs(moved).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    codes = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return codes, scale


def quantize_weight_pow2(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes in -7..7 (0 = zero, sign * (e + 1) for 2^-e) and per-channel scales; returns the
    dequantized weights too."""
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = np.abs(moved).max(axis=1)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    ratio = np.abs(weight) / scale.reshape(shape)
    exponent = np.clip(np.round(-np.log2(np.maximum(ratio, 1e-30))), 0, POW2_EXPONENTS)
    zero = exponent >= POW2_EXPONENTS  # below 2^-6.5: rounds to zero
    codes = np.where(zero, 0, np.sign(weight) * (exponent + 1)).astype(np.int8)
    values = np.where(zero, 0.0, np.sign(weight) * 2.0 ** -exponent) * scale.reshape(shape)
    return codes, scale, values.astype(weight.dtype)


@model_pass
def quantize(graph: Graph, log: PassLog, stats: dict[str, ActivationStats] | None = None, scheme: str = "int8",
             symmetric_activations: bool = False, bias_correction: bool = True,
             keep_fp32: tuple[str, ...] = (), pow2_layers: tuple[str, ...] = ()) -> None:
    """Rewrite every quantizable layer (but ``keep_fp32``) into QDQ form with the given ranges."""
    if scheme not in ("int8", "pow2"):
        raise HwcError(f"unknown quantization scheme {scheme!r}; use int8 or pow2")
    if stats is None:
        raise HwcError("quantization needs calibration statistics (calibrate() first)")
    activations: dict[str, str] = {}
    codes: dict[str, dict[str, Any]] = {}
    for node in quantizable_layers(graph):
        if node.name in keep_fp32:
            log.skipped.append(f"{node.name}: kept fp32")
            continue
        source = node.input[0]
        if source not in stats:
            log.skipped.append(f"{node.name}: no calibration statistics for its input")
            continue
        weight = graph.initializer(node.input[1])
        axis = weight_axis(graph, node)
        if scheme == "int8" and node.name not in pow2_layers:
            q, scale = quantize_weight_int8(weight, axis)
            shape = [1] * weight.ndim
            shape[axis] = -1
            dequantized = q.astype(np.float64) * scale.reshape(shape)
            w_name = graph.add_initializer(f"{node.name}_Wq", q)
            s_name = graph.add_initializer(f"{node.name}_Wscale", scale)
            z_name = graph.add_initializer(f"{node.name}_Wzero", np.zeros(scale.shape, np.int8))
            w_dq = graph.unique_name(f"{node.name}_Wdq")
            graph.insert_before(node, [graph.make_node("DequantizeLinear", [w_name, s_name, z_name], [w_dq],
                                                       name=f"{node.name}_Wdq", axis=axis)])
            graph.set_input(node, 1, w_dq)
        else:
            q, scale, dequantized = quantize_weight_pow2(weight, axis)
            graph.set_constant_input(node, 1, dequantized, "Wpow2")
            codes[node.name] = {"codes": q, "scale": scale, "axis": axis}
        if bias_correction and bias_slot(graph, node) is not None:
            _correct_bias(graph, node, weight, dequantized, axis, stats[source].channel_mean)
        if source not in activations:
            scale_a, zero_a = activation_params(stats[source], symmetric_activations)
            s_name = graph.add_initializer(f"{source}_scale", scale_a)
            z_name = graph.add_initializer(f"{source}_zero", zero_a)
            quantized, dequant = graph.unique_name(f"{source}_q"), graph.unique_name(f"{source}_dq")
            graph.insert_before(node, [
                graph.make_node("QuantizeLinear", [source, s_name, z_name], [quantized], name=f"{source}_Q"),
                graph.make_node("DequantizeLinear", [quantized, s_name, z_name], [dequant], name=f"{source}_DQ")])
            activations[source] = dequant
        graph.set_input(node, 0, activations[source])
        kind = "pow2" if node.name in codes else "int8"
        log.applied.append(f"{node.name}: {kind} weights (per channel), {'int8' if symmetric_activations else 'uint8'} "
                           f"input [{stats[source].low:.3g}, {stats[source].high:.3g}]")
    log.details["pow2_codes"] = codes
    if codes:
        graph.set_metadata(POW2_METADATA, json.dumps(sorted(codes)))


POW2_METADATA = "hwc.pow2_layers"


def pow2_layer_names(model: onnx.ModelProto) -> set[str]:
    """The layers a pow2 quantization left with power-of-two weights (from the model's metadata)."""
    for prop in model.metadata_props:
        if prop.key == POW2_METADATA:
            return set(json.loads(prop.value))
    return set()


def _correct_bias(graph: Graph, node: onnx.NodeProto, weight: np.ndarray, dequantized: np.ndarray, axis: int,
                  channel_mean: np.ndarray) -> None:
    """Subtract ``(W_q - W) E[x]``: exact for dense layers, for convs away from the padding."""
    delta = dequantized.astype(np.float64) - weight
    if node.op_type == "Conv":
        mean = channel_mean if delta.shape[1] == len(channel_mean) else np.full(delta.shape[1], channel_mean.mean())
        shift = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2) @ mean
    else:
        matrix = delta if axis == 1 else delta.T
        shift = channel_mean @ matrix if len(channel_mean) == matrix.shape[0] else np.zeros(matrix.shape[1])
    outputs = len(shift)
    set_bias(graph, node, bias_value(graph, node, outputs) - shift, weight.dtype)


def tensor_sqnr(reference: onnx.ModelProto, quantized: onnx.ModelProto, tensors: list[str],
                feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Signal-to-quantization-noise (dB) of tensors present in both models, over the feeds."""
    names = sorted(set(tensors))
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ref = ort.run_with_intermediates(reference, feed, names)
        got = ort.run_with_intermediates(quantized, feed, names)
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
