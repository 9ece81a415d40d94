"""Rewrite a depthwise convolution with a channel multiplier (``group`` = input channels, ``m``
output channels per group: Keras' ``depth_multiplier``, and what ``convtranspose_as_conv`` makes
of a depthwise transposed conv) into a plain depthwise one.

Output channel ``c*m + j`` reads input channel ``c``: register lanes along output channels would
each need a different, repeated input lane, which neither the depthwise schedule (matching lanes)
nor the dense one (one broadcast) provides, so TVM ran it as a generic loop (2.85x ONNX Runtime).
Here the input is repeated ``m`` times along channels (Concat: input channel ``j*C + c`` is ``c``),
the depthwise conv runs on the ``m*C`` channels with its filters in that order, and a channel
shuffle (Reshape -> Transpose -> Reshape) puts the outputs back in ``c*m + j`` order. The backend
moves both the Concat and the shuffle to the NHWC side of its layout transposes. Exact.
"""

from __future__ import annotations

import numpy as np

from ..model.graph import Graph
from ..model.numeric import conv_output_size
from .base import PassLog, model_pass


@model_pass
def channel_multiplier_as_depthwise(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        shape = graph.shape(node.input[0])
        weight = graph.initializer(node.input[1])
        groups = graph.attrs(node).get("group", 1)
        if shape is None or len(shape) != 4 or weight is None or groups == 1 or groups != shape[1] \
                or weight.shape[1] != 1 or weight.shape[0] == groups:
            continue  # not a depthwise conv with a channel multiplier
        if not all(isinstance(d, int) for d in shape) or (len(node.input) > 2 and node.input[2]
                                                         and not graph.is_constant(node.input[2])) \
                or graph.attrs(node).get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            log.skipped.append(f"{node.name}: needs a static input shape, constant weights and explicit pads")
            continue
        _rewrite(graph, node, shape, weight, groups)
        log.applied.append(f"{node.name}: depthwise conv with channel multiplier {weight.shape[0] // groups} "
                           f"as a depthwise conv over the input repeated {weight.shape[0] // groups} times")


def _rewrite(graph: Graph, node, shape, weight: np.ndarray, channels: int) -> None:
    multiplier = weight.shape[0] // channels
    n, _, h, w = shape
    # Filter of channel j*C + c in the new order = filter c*m + j of the original.
    order = np.arange(channels * multiplier).reshape(channels, multiplier).T.reshape(-1)
    repeated, inner, grouped, moved = (graph.unique_name(f"{node.name}_{s}")
                                       for s in ("repeated", "depthwise", "groups", "moved"))
    graph.set_constant_input(node, 1, weight[order], "Wrepeated")
    if len(node.input) > 2 and node.input[2]:
        graph.set_constant_input(node, 2, graph.initializer(node.input[2])[order], "Brepeated")
    out = node.output[0]
    attrs = graph.attrs(node)
    pads, strides, dilations = attrs.get("pads", [0] * 4), attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    oh, ow = (conv_output_size(size, k, strides[i], dilations[i], pads[i], pads[i + 2])
              for i, (size, k) in enumerate(zip((h, w), weight.shape[2:])))
    graph.set_attr(node, "group", channels * multiplier)
    concat = graph.make_node("Concat", [node.input[0]] * multiplier, [repeated], name=f"{node.name}_repeat", axis=1)
    graph.set_input(node, 0, repeated)
    node.output[0] = inner
    shape_of = lambda dims: graph.add_initializer(f"{node.name}_shape", np.array(dims, np.int64))  # noqa: E731
    graph.insert_before(node, [concat])
    graph.insert_after(node, [
        graph.make_node("Reshape", [inner, shape_of([n, multiplier, channels, oh, ow])], [grouped],
                        name=f"{node.name}_groups"),
        graph.make_node("Transpose", [grouped], [moved], name=f"{node.name}_shuffle", perm=[0, 2, 1, 3, 4]),
        graph.make_node("Reshape", [moved, shape_of([n, channels * multiplier, oh, ow])], [out],
                        name=f"{node.name}_order")])

