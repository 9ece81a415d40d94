"""Gather of one constant index along an axis as the Slice it is (then a Squeeze where the index is
a scalar): timm's vision transformers take Q, K and V as ``qkv[0]``, ``qkv[1]``, ``qkv[2]`` and the
class token as ``x[:, 0]``.

TVM imports a Gather as a ``take`` kernel of its own (indexing through the indices tensor, and a
warning on the console per Gather about its unchecked mode); a Slice and a Squeeze are index
arithmetic that fuses into the kernel reading them. Exact.
"""

from __future__ import annotations

import numpy as np

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def gather_as_slice(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not graph.is_constant(node.input[1]):
            continue
        indices = graph.initializer(node.input[1])
        shape = graph.shape(node.input[0])
        axis = graph.attr(node, "axis", 0)
        if indices.size != 1 or indices.ndim > 1 or not shape or not isinstance(shape[axis], int):
            log.skipped.append(f"{node.name}: not one constant index along a known axis")
            continue
        axis = axis % len(shape)
        index = int(indices.reshape(-1)[0])
        if not -shape[axis] <= index < shape[axis]:
            log.skipped.append(f"{node.name}: index {index} outside the axis's {shape[axis]}")
            continue
        index %= shape[axis]
        sliced = graph.unique_name(f"{node.output[0]}_slice") if indices.ndim == 0 else node.output[0]
        nodes = [graph.make_node("Slice", [node.input[0], graph.add_initializer("starts", np.array([index], np.int64)),
                                           graph.add_initializer("ends", np.array([index + 1], np.int64)),
                                           graph.add_initializer("axes", np.array([axis], np.int64))], [sliced],
                                 name=f"{node.name}_slice")]
        if indices.ndim == 0:
            nodes.append(graph.make_node("Squeeze", [sliced, graph.add_initializer("axes", np.array([axis], np.int64))],
                                         [node.output[0]], name=f"{node.name}_squeeze"))
        graph.replace_node(node, nodes)
        log.applied.append(f"{node.name}: index {index} along axis {axis} as a Slice")
