"""Latency of a target that has no device, from the cycle model in its YAML (``latency.model``).

Each layer costs ``max(compute, memory) + layer_overhead_cycles``:

- compute: a ``mac_array`` of R x C MACs per cycle consumes R input channels and produces C
  output channels at once, so channel counts are padded up to the array:
  ``groups * ceil(Cin_g / R) * ceil(Cout_g / C) * Hout * Wout * kh * kw`` (Gemm/MatMul: rows x 1 x 1);
- memory: weights (int8; at ``weight_bits.pow2`` bits in the layers a pow2 quantization left with
  power-of-two codes), input and output bytes (int8) over ``bytes_per_cycle``;
- LSTM/GRU/RNN layers: per step and direction, the input's and the state's products by their
  weights on the array, and a layer's overhead per step;
- other ops move their int8 output: ``bytes / bytes_per_cycle``; QuantizeLinear/DequantizeLinear
  cost nothing (they only annotate the int8 that the NPU runs in any case), and a layer whose weight
  is a DequantizeLinear of constant codes is priced like one with constant weights.

Milliseconds are cycles at ``clock_mhz``. Every figure from here is reported as ``model``, never as
a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import onnx

from ..config.targets import CycleModel, Target
from ..model.graph import Graph
from ..model.recurrent import GATES
from ..passes.quantize import pow2_layer_names
from .latency import Job, Latency, Measurement, Measurer


def layer_cycles(graph: Graph, node: onnx.NodeProto, params: CycleModel, weights: str = "int8") -> int:
    """Cycles of one op; ``weights`` is how a layer's weights are stored (int8 or pow2)."""
    rows, cols = params.mac_array
    per_cycle = params.bytes_per_cycle
    out = graph.shape(node.output[0]) or ()
    out_bytes = math.prod(d for d in out if isinstance(d, int))
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return 0
    weight = _constant_weight(graph, node) if node.op_type in ("Conv", "Gemm", "MatMul") else None
    if weight is not None:
        in_shape = graph.shape(node.input[0]) or ()
        in_bytes = math.prod(d for d in in_shape if isinstance(d, int))
        if node.op_type == "Conv":
            groups = graph.attr(node, "group", 1)
            cout_g, cin_g = weight.shape[0] // groups, weight.shape[1]
            positions = math.prod(out[2:]) * out[0]
            compute = groups * math.ceil(cin_g / rows) * math.ceil(cout_g / cols) * positions * math.prod(weight.shape[2:])
        else:
            transposed = node.op_type == "Gemm" and graph.attr(node, "transB", 0)
            k, n = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
            compute = math.ceil(k / rows) * math.ceil(n / cols) * (out_bytes // max(n, 1))
        weight_bytes = weight.size * params.bits(weights) / 8
        memory = (weight_bytes + in_bytes + out_bytes) / per_cycle
        return int(max(compute, memory)) + params.layer_overhead_cycles
    if node.op_type in GATES:
        return _recurrent_cycles(graph, node, params, out_bytes)
    return int(out_bytes / per_cycle)


def _recurrent_cycles(graph: Graph, node: onnx.NodeProto, params: CycleModel, out_bytes: int) -> int:
    """An LSTM/GRU/RNN as the array runs it: every step and direction two products of the batch's
    rows (input by W, state by R: I and H input channels, G output channels), and a layer's
    overhead per step, as the steps cannot overlap; memory: weights once, input and outputs."""
    rows, cols = params.mac_array
    x, w, r = (graph.shape(node.input[i]) or () for i in range(3))
    if len(x) != 3 or len(w) != 3 or len(r) != 3 or not all(isinstance(d, int) for d in (*x, *w, *r)):
        return int(out_bytes / params.bytes_per_cycle)
    directions, gates, features = w
    steps_by_batch = x[0] * x[1]  # T * B in either layout
    steps = x[1] if graph.attr(node, "layout", 0) else x[0]
    compute = directions * steps_by_batch * (math.ceil(features / rows) + math.ceil(r[2] / rows)) * math.ceil(gates / cols)
    memory = (math.prod(w) + math.prod(r) + math.prod(x) + out_bytes) / params.bytes_per_cycle
    return int(max(compute, memory)) + params.layer_overhead_cycles * steps * directions


def _constant_weight(graph: Graph, node: onnx.NodeProto):
    """The layer's constant weight, looking through the DequantizeLinear of an int8 QDQ layer."""
    name = node.input[1]
    if graph.is_constant(name):
        return graph.initializer(name)
    producer = graph.producer(name)
    if producer is not None and producer.op_type == "DequantizeLinear" and graph.is_constant(producer.input[0]):
        return graph.initializer(producer.input[0])
    return None


def modelled_latency(model: onnx.ModelProto, target: Target) -> tuple[Latency, list[dict[str, Any]]]:
    params = target.latency.model
    pow2 = pow2_layer_names(model)
    graph = Graph(model)
    graph.infer_shapes()
    table = [{"layer": n.name, "op": n.op_type,
              "cycles": layer_cycles(graph, n, params, "pow2" if n.name in pow2 else "int8")}
             for n in graph.topological_order()]
    return cycles_latency(sum(row["cycles"] for row in table), target), table


def cycles_latency(cycles: int, target: Target) -> Latency:
    """A cycle count as the target's modelled latency (never labelled as measured)."""
    clock = target.latency.model.clock_mhz
    ms = cycles / (clock * 1e3)
    return Latency(method="model", median_ms=ms, p90_ms=ms, min_ms=ms, repeat=1, number=1,
                   device=f"{target.name} cycle model ({cycles:,} cycles at {clock} MHz)")


class CycleModelMeasurer(Measurer):
    """``Measurer`` backend for a target with no device: the ONNX model priced by the cycle model."""

    method = "model"
    needs_library = False

    def __init__(self, target: Target):
        self.target = target

    def identity(self):
        return {"method": self.method, "model": asdict(self.target.latency.model)}

    def description(self) -> str:
        return "with the cycle model"

    def measure(self, job: Job) -> Measurement:
        latency, _ = modelled_latency(job.model, self.target)
        return Measurement(latency, None, f"{self.target.name} has no device to run the artifact on")
