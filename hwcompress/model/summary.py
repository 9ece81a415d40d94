"""What a model is: inputs, outputs, op census, parameters and MACs per layer (``hwc inspect``)."""

from __future__ import annotations

import collections
import math
from typing import Any

import onnx

from .graph import Graph
from .recurrent import GATES


def layer_macs(graph: Graph, node: onnx.NodeProto) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul or recurrent layer for one run;
    None if unknown."""
    if node.op_type in GATES:  # every step: the input and the state times their weights
        x, w, r = (graph.shape(node.input[i]) for i in range(3))
        if x is None or w is None or r is None or not all(isinstance(d, int) for d in x):
            return None
        return math.prod(x[:2]) * w[0] * w[1] * (w[2] + r[2])  # T*B * D*G * (I + H)
    out = graph.shape(node.output[0])
    if out is None or not all(isinstance(d, int) for d in out):
        return None
    if node.op_type == "Conv":
        w = graph.shape(node.input[1])
        return None if w is None else math.prod(out) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        w, x = graph.shape(node.input[1]), graph.shape(node.input[0])
        return None if w is None or x is None else math.prod(x) * math.prod(w[1:])
    if node.op_type in ("Gemm", "MatMul"):
        a = graph.shape(node.input[0])
        if a is None:
            return None
        k = a[0] if node.op_type == "Gemm" and graph.attr(node, "transA", 0) else a[-1]
        return math.prod(out) * k
    return None


def summarize(model: onnx.ModelProto) -> dict[str, Any]:
    graph = Graph(model)

    def describe(v: onnx.ValueInfoProto) -> dict[str, Any]:
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                if v.type.tensor_type.elem_type else None, "shape": list(graph.shape(v.name) or [])}

    layers = []
    for node in graph.topological_order():
        macs = layer_macs(graph, node)
        if macs is None and node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", *GATES):
            continue
        params = sum(graph.initializer(t).size for t in node.input if t and graph.is_constant(t))
        layers.append({"name": node.name, "op": node.op_type, "output_shape": list(graph.shape(node.output[0]) or []),
                       "params": int(params), "macs": macs})
    return {
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [describe(v) for v in graph.inputs],
        "outputs": [describe(v) for v in graph.outputs],
        "nodes": len(graph.nodes),
        "op_census": dict(collections.Counter(n.op_type for n in graph.nodes).most_common()),
        "parameters": int(sum(a.size for a in graph.initializers.values())),
        "parameter_bytes": int(sum(a.nbytes for a in graph.initializers.values())),
        "macs": int(sum(l["macs"] or 0 for l in layers)),
        "layers": layers,
    }


def format_summary(info: dict[str, Any], name: str) -> str:
    """A plain-text rendering for people."""
    def shape(s: list) -> str:
        return "x".join(str(d) for d in s) or "?"

    lines = [f"{name}: ir {info['ir_version']}, opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
             + (f", producer {info['producer']}" if info["producer"] else "")]
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            lines.append(f"  {kind[:-1]:6} {v['name']}: {v['dtype']} [{shape(v['shape'])}]")
    lines.append(f"  nodes  {info['nodes']}: " + ", ".join(f"{op} {n}" for op, n in info["op_census"].items()))
    lines.append(f"  params {info['parameters']:,} ({info['parameter_bytes'] / 2**20:.2f} MiB), "
                 f"MACs {info['macs']:,}")
    if info["layers"]:
        width = max(len(l["name"]) for l in info["layers"])
        lines.append(f"  {'layer':{width}}  {'op':13} {'output':>16} {'params':>11} {'MACs':>15}")
        for l in info["layers"]:
            macs = f"{l['macs']:,}" if l["macs"] is not None else "?"
            lines.append(f"  {l['name']:{width}}  {l['op']:13} {shape(l['output_shape']):>16} "
                         f"{l['params']:>11,} {macs:>15}")
    return "\n".join(lines)
