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

from ..errors import HwcError
from ..model.graph import Graph
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
