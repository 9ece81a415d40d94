"""Remove nodes that compute nothing at inference: Identity, and Dropout whose mask is unused."""

from __future__ import annotations

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def eliminate_identity(graph: Graph, log: PassLog) -> None:
    """Bypass Identity and inference-mode Dropout nodes.

    Dropout is the identity at inference unless ``training_mode`` is fed true; its optional mask
    output must have no reader for the node to go.
    """
    for node in list(graph.nodes):
        if node.op_type not in ("Identity", "Dropout") or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Dropout":
            mask_used = len(node.output) > 1 and node.output[1] and (
                graph.consumers(node.output[1]) or node.output[1] in graph.output_names)
            training = len(node.input) > 2 and node.input[2] and not (
                graph.is_constant(node.input[2]) and not graph.initializer(node.input[2]).any())
            if mask_used or training:
                log.skipped.append(f"{node.name}: Dropout mask is used or training mode may be on")
                continue
        if graph.bypass(node):
            log.applied.append(f"removed {node.op_type} {node.name}")
        else:
            log.skipped.append(f"{node.name}: links a graph input straight to a graph output")
