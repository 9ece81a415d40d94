"""Fold inference BatchNormalization into neighbouring linear layers.

At inference a BatchNormalization is a per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. Where it follows a Conv, Gemm or
MatMul(+Add) whose only reader it is, the map is folded into that layer's weights and bias; where it
precedes an unpadded Conv (so zero padding cannot see the shift), it is folded forward into that Conv;
anywhere else it becomes a cheaper per-channel Mul + Add. Every case is exact up to fp32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def fold_batchnorm(graph: Graph, log: PassLog) -> None:
    """Remove every inference-mode BatchNormalization whose parameters are constants."""
    for bn in [n for n in graph.topological_order() if n.op_type == "BatchNormalization"]:
        affine = _affine(graph, bn)
        if isinstance(affine, str):
            log.skipped.append(f"{bn.name}: {affine}")
            continue
        scale, shift = affine
        for fold in (_into_conv, _into_gemm, _into_matmul, _forward_into_conv, _as_mul_add):
            done = fold(graph, bn, scale, shift)
            if done:
                log.applied.append(f"{bn.name}: {done}")
                break
        else:
            log.skipped.append(f"{bn.name}: rank of its input is unknown")


def _affine(graph: Graph, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
    params = [graph.initializer(name) for name in bn.input[1:5]]
    if any(p is None for p in params):
        return "parameters are not constants"
    if graph.attr(bn, "training_mode", 0) or any(o and graph.consumers(o) for o in bn.output[1:]):
        return "training-mode BatchNormalization"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + graph.attr(bn, "epsilon", 1e-5))
    return scale, beta - mean * scale


def _sole_producer(graph: Graph, bn: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
    """The node of ``op_type`` that feeds the BN and is read by nothing else."""
    producer = graph.producer(bn.input[0])
    if producer is None or producer.op_type != op_type or graph.sole_consumer(bn.input[0]) is not bn:
        return None
    return producer


def _set_input(graph: Graph, node: onnx.NodeProto, index: int, hint: str, array: np.ndarray,
               dtype: np.dtype) -> None:
    graph.set_constant_input(node, index, array.astype(dtype), hint)


def _into_conv(graph: Graph, bn, scale, shift) -> str | None:
    conv = _sole_producer(graph, bn, "Conv")
    if conv is None or not graph.is_constant(conv.input[1]):
        return None
    if len(conv.input) > 2 and conv.input[2] and not graph.is_constant(conv.input[2]):
        return None
    weight = graph.initializer(conv.input[1])
    bias = graph.initializer(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else 0.0
    folded_w = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    _set_input(graph, conv, 1, "W", folded_w, weight.dtype)
    _set_input(graph, conv, 2, "B", bias * scale + shift, weight.dtype)
    graph.bypass(bn)
    return f"folded into Conv {conv.name}"


def _into_gemm(graph: Graph, bn, scale, shift) -> str | None:
    gemm = _sole_producer(graph, bn, "Gemm")
    if gemm is None or not graph.is_constant(gemm.input[1]):
        return None
    if len(gemm.input) > 2 and gemm.input[2] and not graph.is_constant(gemm.input[2]):
        return None
    b = graph.initializer(gemm.input[1])
    folded_b = b * (scale[:, None] if graph.attr(gemm, "transB", 0) else scale[None, :])
    c = graph.initializer(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else np.zeros(1)
    _set_input(graph, gemm, 1, "B", folded_b, b.dtype)
    _set_input(graph, gemm, 2, "C", graph.attr(gemm, "beta", 1.0) * c * scale + shift, b.dtype)
    graph.set_attr(gemm, "beta", 1.0)
    graph.bypass(bn)
    return f"folded into Gemm {gemm.name}"


def _into_matmul(graph: Graph, bn, scale, shift) -> str | None:
    """MatMul (optionally + a constant bias Add) with a 2-D output, so the BN axis is its last."""
    if graph.rank(bn.input[0]) != 2:
        return None
    add = _sole_producer(graph, bn, "Add")
    bias_index = None
    matmul_out = bn.input[0]
    if add is not None:
        bias_index = next((i for i, t in enumerate(add.input) if graph.is_constant(t)), None)
        if bias_index is None:
            return None
        matmul_out = add.input[1 - bias_index]
    matmul = graph.producer(matmul_out)
    if matmul is None or matmul.op_type != "MatMul" or not graph.is_constant(matmul.input[1]):
        return None
    if graph.sole_consumer(matmul_out) is not (bn if add is None else add):
        return None
    weight = graph.initializer(matmul.input[1])
    if weight.ndim != 2:
        return None
    _set_input(graph, matmul, 1, "B", weight * scale[None, :], weight.dtype)
    if add is not None:
        bias = graph.initializer(add.input[bias_index])
        _set_input(graph, add, bias_index, "bias", bias * scale + shift, bias.dtype)
        graph.bypass(bn)
        return f"folded into MatMul {matmul.name} and Add {add.name}"
    shift_name = graph.add_initializer(f"{bn.name}_shift", shift.astype(weight.dtype))
    graph.replace_node(bn, [graph.make_node("Add", [bn.input[0], shift_name], [bn.output[0]], name=bn.name)])
    return f"folded into MatMul {matmul.name} (+ bias Add)"


def _forward_into_conv(graph: Graph, bn, scale, shift) -> str | None:
    """BN -> Conv without padding: ``W * s`` per input channel and ``W . t`` added to the bias."""
    conv = graph.sole_consumer(bn.output[0])
    if conv is None or conv.op_type != "Conv" or conv.input[0] != bn.output[0]:
        return None
    if not graph.is_constant(conv.input[1]) or (len(conv.input) > 2 and conv.input[2]
                                                  and not graph.is_constant(conv.input[2])):
        return None
    pads = graph.attr(conv, "pads", [])
    if any(pads) or graph.attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        return None
    weight = graph.initializer(conv.input[1])
    groups = graph.attr(conv, "group", 1)
    out_ch, in_per_group = weight.shape[:2]
    # Input channel read by weight[o, j] is (group of o) * in_per_group + j.
    channel = (np.arange(out_ch)[:, None] // (out_ch // groups)) * in_per_group + np.arange(in_per_group)[None, :]
    spatial = (1,) * (weight.ndim - 2)
    s = scale[channel].reshape(weight.shape[:2] + spatial)
    t = shift[channel].reshape(weight.shape[:2] + spatial)
    bias = graph.initializer(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else 0.0
    new_bias = bias + (weight.astype(np.float64) * t).sum(axis=tuple(range(1, weight.ndim)))
    _set_input(graph, conv, 1, "W", weight * s, weight.dtype)
    _set_input(graph, conv, 2, "B", new_bias, weight.dtype)
    graph.bypass(bn)
    return f"folded forward into unpadded Conv {conv.name}"


def _as_mul_add(graph: Graph, bn, scale, shift) -> str | None:
    rank = graph.rank(bn.input[0])
    if rank is None:
        return None
    dtype = graph.initializer(bn.input[1]).dtype
    shape = (-1,) + (1,) * (rank - 2)
    s = graph.add_initializer(f"{bn.name}_scale", scale.reshape(shape).astype(dtype))
    t = graph.add_initializer(f"{bn.name}_shift", shift.reshape(shape).astype(dtype))
    scaled = graph.unique_name(f"{bn.name}_scaled")
    graph.replace_node(bn, [graph.make_node("Mul", [bn.input[0], s], [scaled], name=f"{bn.name}_mul"),
                            graph.make_node("Add", [scaled, t], [bn.output[0]], name=f"{bn.name}_add")])
    return "no linear neighbour to fold into: rewritten as per-channel Mul + Add"
