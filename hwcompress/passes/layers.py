"""Facts about linear layers (Conv, Gemm, MatMul) that several passes need."""

from __future__ import annotations

import numpy as np
import onnx

from ..model.graph import Graph


def layer_matrix(graph: Graph, node: onnx.NodeProto) -> np.ndarray:
    """A Conv (group 1) / Gemm / MatMul as ``x [inputs] -> x @ M [outputs]`` (alpha folded in), float64."""
    weight = graph.initializer(node.input[1]).astype(np.float64)
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    if node.op_type == "Gemm":
        return (weight.T if graph.attr(node, "transB", 0) else weight) * graph.attr(node, "alpha", 1.0)
    return weight


def bias_slot(graph: Graph, node: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | None:
    """Where a layer's per-output bias lives: its own input 2 (Conv, Gemm), or the constant of an
    Add that alone reads a MatMul's output. None where there is no place for one."""
    if node.op_type in ("Conv", "Gemm"):
        return node, 2
    if node.op_type == "MatMul":
        add = graph.sole_consumer(node.output[0])
        if add is not None and add.op_type == "Add":
            for i, t in enumerate(add.input):
                if t != node.output[0] and graph.is_constant(t):
                    return add, i
    return None


def layer_channel_axis(node: onnx.NodeProto) -> int:
    """Where a layer's output keeps its channels: axis 1 of a Conv's, the last of a Gemm's or a
    MatMul's (a sequence model's [batch, steps, features])."""
    return 1 if node.op_type == "Conv" else -1


def along_axis(value: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``value`` with its ``axis`` (length n) mapped by ``matrix`` [n, k] to length k (a layer's
    channels taken into another basis), in float64, returned in ``value``'s dtype."""
    mapped = np.tensordot(value.astype(np.float64), matrix, axes=([axis], [0]))
    return np.moveaxis(mapped, -1, axis).astype(value.dtype)


def bias_value(graph: Graph, node: onnx.NodeProto, outputs: int) -> np.ndarray:
    """The layer's effective bias as a float64 vector of ``outputs`` (zeros where it has none)."""
    slot = bias_slot(graph, node)
    if slot is None:
        return np.zeros(outputs)
    owner, index = slot
    if len(owner.input) <= index or not owner.input[index]:
        return np.zeros(outputs)
    value = graph.initializer(owner.input[index]).astype(np.float64)
    if node.op_type == "Gemm":
        value = value * graph.attr(node, "beta", 1.0)
    return np.broadcast_to(value.reshape(-1) if value.size == outputs else value, (outputs,)).copy()


def set_bias(graph: Graph, node: onnx.NodeProto, bias: np.ndarray, dtype) -> bool:
    """Store ``bias`` as the layer's bias; False where the layer has no place for one."""
    slot = bias_slot(graph, node)
    if slot is None:
        return False
    owner, index = slot
    if node.op_type == "Gemm":
        graph.set_attr(node, "beta", 1.0)
    if owner is not node:
        old = graph.initializer(owner.input[index])
        if old.size not in (1, bias.size):
            return False
        bias = bias.reshape(old.shape if old.size == bias.size else (-1,))
    graph.set_constant_input(owner, index, bias.astype(dtype), "bias")
    return True
