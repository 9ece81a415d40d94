"""Resolve ``auto_pad`` of Conv and pooling into explicit ``pads``.

TVM's importer lowers ``auto_pad=SAME_*`` into a separate padding kernel in front of the layer;
with explicit pads the padding is part of the layer (fused, and visible to the int8 lowering).
Exact: the same pads, written out.
"""

from __future__ import annotations

from ..model.graph import Graph
from ..model.numeric import conv_pads
from .base import PassLog, model_pass

_OPS = ("Conv", "MaxPool", "AveragePool")


@model_pass
def explicit_pads(graph: Graph, log: PassLog) -> None:
    """Replace ``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID) by the ``pads`` it stands for (2-D only)."""
    for node in graph.nodes:
        attrs = graph.attrs(node)
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if node.op_type not in _OPS or auto == "NOTSET":
            continue
        shape = graph.shape(node.input[0])
        if node.op_type == "Conv":
            weight = graph.initializer(node.input[1]) if graph.is_constant(node.input[1]) else None
            kernel = attrs.get("kernel_shape") or (list(weight.shape[2:]) if weight is not None else None)
        else:
            kernel = attrs.get("kernel_shape")
        if not shape or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]) or not kernel:
            log.skipped.append(f"{node.name}: auto_pad {auto} left as is (needs a static 2-D input)")
            continue
        pads = (0, 0, 0, 0) if auto == "VALID" else conv_pads(
            attrs, shape[2:], kernel, attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1]))
        graph.set_attr(node, "auto_pad", "NOTSET")
        graph.set_attr(node, "pads", list(pads))
        log.applied.append(f"{node.name}: auto_pad {auto} -> pads {list(pads)}")
