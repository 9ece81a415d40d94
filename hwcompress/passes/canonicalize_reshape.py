"""Rewrite Reshapes that merely flatten into Flatten, the form later passes reason about.

Pruning follows channels from a Conv through ``Flatten`` into a Gemm's input features in blocks of
H*W; a Reshape with a constant target shape that does the same thing hides that structure.
"""

from __future__ import annotations

import math

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def canonicalize_reshape(graph: Graph, log: PassLog) -> None:
    """Replace ``Reshape(x, [a, b])`` by ``Flatten(x, axis=k)`` where a, b = prod(x[:k]), prod(x[k:])."""
    for node in list(graph.nodes):
        if node.op_type != "Reshape" or not graph.is_constant(node.input[1]):
            continue
        in_shape = graph.shape(node.input[0])
        out_shape = graph.shape(node.output[0])
        if not in_shape or not out_shape or len(out_shape) != 2 or not all(
                isinstance(d, int) for d in in_shape + out_shape):
            continue
        axis = next((k for k in range(1, len(in_shape) + 1)
                     if (math.prod(in_shape[:k]), math.prod(in_shape[k:])) == tuple(out_shape)), None)
        if axis is None:
            continue
        graph.replace_node(node, [graph.make_node("Flatten", [node.input[0]], [node.output[0]],
                                                  name=node.name, axis=axis)])
        log.applied.append(f"{node.name}: Reshape {list(in_shape)} -> {list(out_shape)} is Flatten(axis={axis})")
