"""Rewrite a transposed convolution whose stride equals its kernel (the 2x2, stride 2 upsampling of
U-Nets and FPN necks) into a 1x1 convolution followed by a pixel shuffle.

Such a ConvTranspose writes each output pixel from exactly one input pixel:
``y[n, o, h*kh + i, w*kw + j] = sum_c x[n, c, h, w] * W[c, o, i, j] + B[o]``, i.e. a 1x1 conv to
``Co*kh*kw`` channels, then a Reshape -> Transpose -> Reshape that moves the ``kh*kw`` channel groups
into space. Exact. TVM lowers ConvTranspose as a convolution over a zero-dilated input (kh*kw times
the work, and no NHWC form), while the 1x1 conv gets the project's register-blocked schedule.
"""

from __future__ import annotations

import numpy as np

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def convtranspose_as_conv(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type != "ConvTranspose":
            continue
        why = _not_applicable(graph, node)
        if why:
            log.skipped.append(f"{node.name}: {why}")
            continue
        weight = graph.initializer(node.input[1])
        cin, cout, kh, kw = weight.shape
        n, _, h, w = graph.shape(node.input[0])
        matrix = weight.transpose(1, 2, 3, 0).reshape(cout * kh * kw, cin, 1, 1)
        inputs = [node.input[0], graph.add_initializer(f"{node.name}_W1x1", matrix)]
        if len(node.input) > 2 and node.input[2]:
            bias = np.repeat(graph.initializer(node.input[2]), kh * kw)
            inputs.append(graph.add_initializer(f"{node.name}_B1x1", bias.astype(weight.dtype)))
        conv, grouped, moved = (graph.unique_name(f"{node.name}_{s}") for s in ("1x1", "groups", "moved"))
        shape = lambda dims: graph.add_initializer(f"{node.name}_shape", np.array(dims, np.int64))  # noqa: E731
        graph.replace_node(node, [
            graph.make_node("Conv", inputs, [conv], name=f"{node.name}_1x1", kernel_shape=[1, 1]),
            graph.make_node("Reshape", [conv, shape([n, cout, kh, kw, h, w])], [grouped], name=f"{node.name}_groups"),
            graph.make_node("Transpose", [grouped], [moved], name=f"{node.name}_shuffle", perm=[0, 1, 4, 2, 5, 3]),
            graph.make_node("Reshape", [moved, shape([n, cout, h * kh, w * kw])], [node.output[0]], name=node.name)])
        log.applied.append(f"{node.name}: ConvTranspose {kh}x{kw} stride {kh}x{kw} is a 1x1 conv to "
                           f"{cout * kh * kw} channels and a pixel shuffle")


def _not_applicable(graph: Graph, node) -> str | None:
    if not graph.is_constant(node.input[1]) or (len(node.input) > 2 and node.input[2]
                                                 and not graph.is_constant(node.input[2])):
        return "weights are not constant"
    weight = graph.initializer(node.input[1])
    shape = graph.shape(node.input[0])
    if weight.ndim != 4 or not shape or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return "not a 2-D transposed convolution with a static input shape"
    kernel = list(weight.shape[2:])
    attrs = graph.attrs(node)
    if (attrs.get("group", 1) != 1 or list(attrs.get("strides", [1, 1])) != kernel
            or any(attrs.get("pads", [0] * 4)) or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or any(attrs.get("output_padding", [0, 0])) or "output_shape" in attrs
            or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
        return "outputs overlap or are padded (only stride == kernel, no padding, one group is rewritten)"
    return None
