"""Run 1-D convolutions and pools (audio and sequence models: ``[N, C, L]`` tensors) as 2-D ones
over ``[N, C, 1, L]``.

TVM imports a 1-D Conv as ``conv1d``, which has no NHWC layout rule and no schedule of the
project's: it runs as MetaSchedule's generic loop (an M5-style raw-waveform CNN 28x slower than
ONNX Runtime). As a 2-D conv with a 1-row kernel it gets the register-blocked schedule. Each 1-D
Conv, ConvTranspose, MaxPool and AveragePool becomes Unsqueeze -> the 2-D op -> Squeeze; each
Squeeze is then moved below the elementwise ops that follow it (activations, BatchNormalization,
per-channel or scalar arithmetic with constants, a residual Add of two such tensors, global
pooling), where it meets the next layer's Unsqueeze and both go: a stack of 1-D layers runs on
4-D tensors from its first layer to its last. Exact.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..model.graph import Graph
from .base import PassLog, model_pass

_LAYERS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool")
# Ops that compute the same on [N, C, 1, L] as on [N, C, L] (their constants reshaped to match):
# a Squeeze of the row axis can move from before them to after them.
_ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Elu", "Selu", "Softplus",
                "Softsign", "Clip", "Erf", "Neg", "Abs", "Exp", "Sqrt", "Identity", "Cast", "PRelu", "Add", "Sub",
                "Mul", "Div", "Max", "Min", "Pow"}
_CHANNEL_WISE = {"BatchNormalization", "GlobalAveragePool", "GlobalMaxPool"}  # constants are per channel


@model_pass
def conv1d_as_conv2d(graph: Graph, log: PassLog) -> None:
    squeezes = []
    for node in list(graph.nodes):
        if node.op_type not in _LAYERS or node.domain not in ("", "ai.onnx") or graph.rank(node.input[0]) not in (3, None):
            continue
        why = _not_applicable(graph, node)
        if why:
            log.skipped.append(f"{node.name}: {why}")
            continue
        squeezes.append(_as_2d(graph, node))
        log.applied.append(f"{node.name}: 1-D {node.op_type} as a 2-D one over [N, C, 1, L]")
    moved = _sink(graph, squeezes)
    if moved:
        log.details["squeezes_moved_past"] = moved


def _not_applicable(graph: Graph, node) -> str | None:
    if graph.rank(node.input[0]) is None:
        return "rank of its input is unknown"
    if node.op_type in ("Conv", "ConvTranspose") and not graph.is_constant(node.input[1]):
        return "weights are not constant"
    if len([o for o in node.output if o]) > 1:
        return "its indices output is used"
    return None


def _as_2d(graph: Graph, node) -> onnx.NodeProto:
    """Unsqueeze -> ``node`` over [N, C, 1, L] -> Squeeze in place of ``node``; the Squeeze."""
    attrs = graph.attrs(node)
    spatial = {"kernel_shape": 1, "strides": 1, "dilations": 1, "output_padding": 0, "output_shape": 1}
    for name, row in spatial.items():
        if name in attrs:
            graph.set_attr(node, name, [row, *attrs[name]])
    if "pads" in attrs:
        graph.set_attr(node, "pads", [0, attrs["pads"][0], 0, attrs["pads"][1]])
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = graph.initializer(node.input[1])
        graph.set_constant_input(node, 1, weight[:, :, None, :], "W2d")
    wide, out = graph.unique_name(f"{node.input[0]}_2d"), node.output[0]
    node.output[0] = graph.unique_name(f"{out}_2d")  # ``out`` keeps its name and shape: the Squeeze's now
    unsqueeze = _axis_op(graph, "Unsqueeze", node.input[0], wide, node.name)
    squeeze = _axis_op(graph, "Squeeze", node.output[0], out, node.name)
    graph.set_input(node, 0, wide)
    graph.insert_before(node, [unsqueeze])
    graph.insert_after(node, [squeeze])
    return squeeze


def _axis_op(graph: Graph, op: str, source: str, out: str, name: str):
    """``op`` (Squeeze or Unsqueeze) of axis 2, the row axis."""
    if graph.opset >= 13:
        axes = graph.add_initializer(f"{name}_row_axis", np.array([2], np.int64))
        return graph.make_node(op, [source, axes], [out], name=f"{name}_{op.lower()}")
    return graph.make_node(op, [source], [out], name=f"{name}_{op.lower()}", axes=[2])


def _is_row_axis_op(graph: Graph, node, op: str) -> bool:
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
        return False
    if len(node.input) > 1 and node.input[1]:
        axes = graph.initializer(node.input[1])
        return axes is not None and [int(a) for a in np.ravel(axes)] == [2]
    return list(graph.attr(node, "axes", [])) == [2]


def _sink(graph: Graph, squeezes: list) -> int:
    """Move each Squeeze below the elementwise ops after it and cancel it against Unsqueezes;
    the number of ops it moved past."""
    moved, work = 0, list(squeezes)
    while work:
        squeeze = work.pop()
        if not any(n is squeeze for n in graph.nodes):
            continue
        wide, narrow = squeeze.input[0], squeeze.output[0]
        for reader in graph.consumers(narrow):
            if _is_row_axis_op(graph, reader, "Unsqueeze") and reader.output[0] not in graph.output_names:
                graph.remove_node(reader)
                graph.replace_uses(reader.output[0], wide)
                continue
            inputs = _wide_inputs(graph, reader)
            if inputs is None:
                continue
            out = reader.output[0]
            reader_wide = graph.unique_name(f"{out}_2d")
            for i, name in enumerate(inputs):
                graph.set_input(reader, i, name)
            reader.output[0] = reader_wide
            after = _axis_op(graph, "Squeeze", reader_wide, out, reader.name)
            graph.insert_after(reader, [after])
            work.append(after)
            moved += 1
        if not graph.consumers(narrow) and narrow not in graph.output_names:
            graph.remove_node(squeeze)
    return moved


def _wide_inputs(graph: Graph, node) -> list[str] | None:
    """``node``'s inputs as they would be for [N, C, 1, L] tensors (a row-axis Squeeze's input in
    place of its output, constants reshaped), or None where ``node`` cannot move past."""
    if node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1 \
            or node.op_type not in _ELEMENTWISE | _CHANNEL_WISE:
        return None
    wide = []
    for name in node.input:
        producer = graph.producer(name) if name else None
        if not name:
            wide.append(name)
        elif _is_row_axis_op(graph, producer, "Squeeze"):
            wide.append(producer.input[0])
        elif graph.is_constant(name):
            value = graph.initializer(name)
            if node.op_type in _CHANNEL_WISE or node.op_type == "Clip" or value.ndim <= 1:
                wide.append(name)  # per channel, a scalar, or along L (the last axis either way)
            elif value.ndim <= 3:  # broadcast against [N, C, L]: the row axis goes before L
                value = value.reshape((1,) * (3 - value.ndim) + value.shape)
                wide.append(graph.add_initializer(f"{name}_2d", value[:, :, None, :]))
            else:
                return None
        else:
            return None
    return wide
