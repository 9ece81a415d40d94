"""Latency of a target that has no device, from the cycle model in its YAML (``latency.model``).

Each layer costs ``max(compute, memory) + layer_overhead_cycles``:

- compute: a ``mac_array`` of R x C MACs per cycle consumes R input channels and produces C
  output channels at once, so channel counts are padded up to the array:
  ``groups * ceil(Cin_g / R) * ceil(Cout_g / C) * Hout * Wout * kh * kw`` (Gemm/MatMul: rows x 1 x 1);
- memory: int8 weights, input and output bytes over ``bytes_per_cycle``;
- other ops move their int8 output: ``bytes / bytes_per_cycle``.

Milliseconds are cycles at ``clock_mhz``. Every figure from here is reported as ``model``, never as
a measurement.
"""

from __future__ import annotations

import math
from typing import Any

import onnx

from .config import Target
from .graph import Graph
from .measure import Latency


def layer_cycles(graph: Graph, node: onnx.NodeProto, params: dict[str, Any]) -> int:
    rows, cols = params["mac_array"]
    per_cycle = params["bytes_per_cycle"]
    out = graph.shape(node.output[0]) or ()
    out_bytes = math.prod(d for d in out if isinstance(d, int))
    if node.op_type in ("Conv", "Gemm", "MatMul") and graph.is_constant(node.input[1]):
        weight = graph.initializer(node.input[1])
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
        memory = (weight.size + in_bytes + out_bytes) / per_cycle
        return int(max(compute, memory)) + params["layer_overhead_cycles"]
    return int(out_bytes / per_cycle)


def modelled_latency(model: onnx.ModelProto, target: Target) -> tuple[Latency, list[dict[str, Any]]]:
    params = target.latency["model"]
    graph = Graph(model)
    graph.infer_shapes()
    table = [{"layer": n.name, "op": n.op_type, "cycles": layer_cycles(graph, n, params)}
             for n in graph.topological_order()]
    return cycles_latency(sum(row["cycles"] for row in table), target), table


def cycles_latency(cycles: int, target: Target) -> Latency:
    """A cycle count as the target's modelled latency (never labelled as measured)."""
    clock = target.latency["model"]["clock_mhz"]
    ms = cycles / (clock * 1e3)
    return Latency(method="model", median_ms=ms, p90_ms=ms, min_ms=ms, repeat=1, number=1,
                   device=f"{target.name} cycle model ({cycles:,} cycles at {clock} MHz)")
