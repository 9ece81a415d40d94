"""Import models that arrive already quantized in QOperator form as QDQ.

Quantizers (ONNX Runtime's ``quantize_static`` with ``QuantFormat.QOperator``, older TFLite and
Paddle converters) write fused integer ops: ``QLinearConv``, ``QLinearMatMul`` and the
``com.microsoft`` ``QLinearAdd``/``QLinearMul``/``QLinearConcat``/``QLinearGlobalAveragePool``/....
Each is by definition ``Quantize(op(Dequantize(a), Dequantize(b), ...))``, so it is rewritten into
exactly that: DequantizeLinear for every quantized input (per-channel weights keep their axis, an
int32 bias is dequantized with scale ``s_x * s_w``), the float op, and a QuantizeLinear on the
output. The result is the QDQ form the rest of hwc reads (int8 lowering turns conv/matmul between
DequantizeLinear nodes back into integer kernels). The rewrite is exact: ONNX Runtime gives the
same outputs within one quantization step (it rounds fused intermediate values differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import Graph

_MS = "com.microsoft"


@dataclass(frozen=True)
class _QOp:
    """One QOperator op: where its quantized inputs and output scale sit, and the float op it wraps."""

    float_op: str
    triples: tuple[int, ...]     # first index of each (tensor, scale, zero point) input
    output: int | None           # index of the output's (scale, zero point); None: float output
    bias: int | None = None      # index of an int32 bias, dequantized with s_first * s_second
    weight_axis: str = ""        # how the second tensor's per-channel axis is found: "conv", "matmul", "gemm"
    variadic_from: int | None = None   # QLinearConcat: triples from here to the end
    dropped_attrs: tuple[str, ...] = ()


_OPS: dict[tuple[str, str], _QOp] = {
    ("", "QLinearConv"): _QOp("Conv", (0, 3), 6, bias=8, weight_axis="conv"),
    ("", "QLinearMatMul"): _QOp("MatMul", (0, 3), 6, weight_axis="matmul"),
    (_MS, "QGemm"): _QOp("Gemm", (0, 3), 7, bias=6, weight_axis="gemm"),
    (_MS, "QLinearAdd"): _QOp("Add", (0, 3), 6),
    (_MS, "QLinearMul"): _QOp("Mul", (0, 3), 6),
    (_MS, "QLinearSigmoid"): _QOp("Sigmoid", (0,), 3),
    (_MS, "QLinearLeakyRelu"): _QOp("LeakyRelu", (0,), 3),
    (_MS, "QLinearGlobalAveragePool"): _QOp("GlobalAveragePool", (0,), 3, dropped_attrs=("channels_last",)),
    (_MS, "QLinearAveragePool"): _QOp("AveragePool", (0,), 3, dropped_attrs=("channels_last",)),
    (_MS, "QLinearConcat"): _QOp("Concat", (), 0, variadic_from=2),
}


def qoperator_ops() -> list[str]:
    """The QOperator ops hwc imports, as users see them named."""
    return sorted((f"{d}." if d else "") + op for d, op in _OPS)


def has_qoperator_nodes(model: onnx.ModelProto) -> bool:
    return any((n.domain if n.domain != "ai.onnx" else "", n.op_type) in _OPS for n in model.graph.node)


class QOperatorError(ValueError):
    """A QOperator node that has no exact QDQ form (the message names it and why)."""


def qoperator_as_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every QOperator node of ``_OPS`` rewritten as DequantizeLinear -> float op -> QuantizeLinear."""
    if not has_qoperator_nodes(model):
        return model
    graph = Graph(model)
    for node in list(graph.nodes):
        spec = _OPS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if spec is not None:
            graph.replace_node(node, _rewrite(graph, node, spec))
    return graph.to_model(infer=False)


def _rewrite(graph: Graph, node: onnx.NodeProto, spec: _QOp) -> list[onnx.NodeProto]:
    attrs = {k: v for k, v in graph.attrs(node).items() if k not in spec.dropped_attrs}
    if graph.attrs(node).get("channels_last", 0):
        raise QOperatorError(f"{node.op_type} node {node.name}: channels_last=1 is not supported")
    inputs = list(node.input)
    starts = list(spec.triples)
    if spec.variadic_from is not None:
        starts = list(range(spec.variadic_from, len(inputs), 3))
    new_nodes: list[onnx.NodeProto] = []
    float_inputs = []
    for position, start in enumerate(starts):
        tensor, scale, zero = (inputs + ["", "", ""])[start:start + 3]
        axis = _weight_axis(graph, spec, attrs, inputs[start + 1]) if position == 1 else None
        float_inputs.append(_dequantize(graph, node, tensor, scale, zero, axis, new_nodes))
    if spec.bias is not None and len(inputs) > spec.bias and inputs[spec.bias]:
        float_inputs.append(_dequantized_bias(graph, node, spec, attrs, inputs, new_nodes))
    has_output_scale = spec.output is not None and len(inputs) > spec.output and inputs[spec.output]
    float_out = graph.unique_name(f"{node.output[0]}_float") if has_output_scale else node.output[0]
    new_nodes.append(graph.make_node(spec.float_op, float_inputs, [float_out], name=f"{node.name}_float", **attrs))
    if has_output_scale:
        scale, zero = (inputs + ["", ""])[spec.output:spec.output + 2]
        new_nodes.append(graph.make_node("QuantizeLinear", [float_out, scale] + ([zero] if zero else []),
                                         [node.output[0]], name=node.name))
    return new_nodes


def _dequantize(graph, node, tensor, scale, zero, axis, new_nodes) -> str:
    out = graph.unique_name(f"{tensor}_dequantized")
    extra = {"axis": axis} if axis is not None and _size(graph, scale) != 1 else {}
    new_nodes.append(graph.make_node("DequantizeLinear", [tensor, scale] + ([zero] if zero else []), [out],
                                     name=f"{node.name}_dq", **extra))
    return out


def _dequantized_bias(graph, node, spec, attrs, inputs, new_nodes) -> str:
    """The int32 bias of QLinearConv/QGemm, whose scale is the product of the two input scales."""
    x_scale, w_scale = inputs[spec.triples[0] + 1], inputs[spec.triples[1] + 1]
    xs, ws = graph.initializer(x_scale), graph.initializer(w_scale)
    if xs is None or ws is None:
        raise QOperatorError(f"{node.op_type} node {node.name}: a bias needs constant input scales")
    scale = graph.add_initializer(f"{node.name}_bias_scale",
                                  (xs.astype(np.float32).reshape(-1) * ws.astype(np.float32).reshape(-1)))
    if graph.initializer(scale).size == 1:
        graph.set_initializer(scale, graph.initializer(scale).reshape(()))
    out = graph.unique_name(f"{inputs[spec.bias]}_dequantized")
    extra = {"axis": 0} if graph.initializer(scale).size != 1 else {}
    new_nodes.append(graph.make_node("DequantizeLinear", [inputs[spec.bias], scale], [out],
                                     name=f"{node.name}_bias_dq", **extra))
    return out


def _weight_axis(graph, spec, attrs, scale_name) -> int | None:
    if not spec.weight_axis or _size(graph, scale_name) == 1:
        return None
    if spec.weight_axis == "conv":
        return 0
    if spec.weight_axis == "gemm":
        return 0 if attrs.get("transB", 0) else 1
    return -1   # MatMul: one scale per output column


def _size(graph: Graph, name: str) -> int | None:
    value = graph.initializer(name)
    if value is not None:
        return value.size
    shape = graph.shape(name)
    return int(np.prod(shape)) if shape and all(isinstance(d, int) for d in shape) else None
