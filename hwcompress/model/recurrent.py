"""What the ONNX recurrent ops (LSTM, GRU, RNN) are made of, read from a node's attributes, and
whether hwc can compile one: TVM's ONNX frontend imports none of them, so the loader accepts
exactly those that the backend's loop kernels (``backend.recurrent_loops``, CPUs) and
``passes.unroll_recurrent`` (GPUs) both take, and refuses the others with the reason."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import Graph

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_OPS = frozenset(GATES)  # TVM imports none of them; the importer compiles them itself
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# ONNX activation name -> (op, alpha default, beta default); None: the op takes no parameter.
_ACTIVATIONS = {"sigmoid": ("Sigmoid", None, None), "tanh": ("Tanh", None, None), "relu": ("Relu", None, None),
                "softsign": ("Softsign", None, None), "softplus": ("Softplus", None, None),
                "leakyrelu": ("LeakyRelu", 0.01, None), "thresholdedrelu": ("ThresholdedRelu", 1.0, None),
                "elu": ("Elu", 1.0, None), "hardsigmoid": ("HardSigmoid", 0.2, 0.5),
                "affine": ("Affine", 1.0, 0.0), "scaledtanh": ("ScaledTanh", 1.0, 1.0)}


def uncompilable_recurrent_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """Each recurrent node hwc cannot compile, with the reason (the loader refuses such models
    with it: TVM cannot import them either)."""
    nodes = [n for n in model.graph.node if n.op_type in GATES and n.domain in ("", "ai.onnx")]
    if not nodes:
        return []
    graph = Graph(onnx.shape_inference.infer_shapes(model))
    return [(node, why) for node in nodes if (why := why_not_compilable(graph, node))]


def why_not_compilable(graph: Graph, node) -> str | None:
    """Why ``node`` cannot be compiled (a phrase for a user; neither as a loop kernel nor
    unrolled), or None where it can."""
    if graph.opset < 13:
        return f"opset {graph.opset} (hwc's loader converts models to opset 17 first)"
    if direction(graph, node) not in ("forward", "reverse", "bidirectional"):
        return f"direction {direction(graph, node)!r} is not forward, reverse or bidirectional"
    inputs = list(node.input) + [""] * 8
    weights = [inputs[1], inputs[2], inputs[3], inputs[7] if node.op_type == "LSTM" else ""]
    if not all(graph.is_constant(name) for name in weights if name):
        return "weights are not constant"
    shape = graph.shape(node.input[0])
    if not shape or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        return "the input's shape is not static (give --input-shape)"
    steps = shape[1] if graph.attr(node, "layout", 0) else shape[0]
    if inputs[4]:
        lengths = graph.initializer(inputs[4])
        if lengths is None or np.any(np.asarray(lengths) != steps):
            return "sequence_lens differ from the sequence length (per-entry lengths are not compiled)"
    try:
        activations(graph, node)
    except ValueError as exc:
        return str(exc)
    return None


def activations(graph: Graph, node) -> list[tuple[str, float | None, float | None]]:
    """Per direction, each activation of ``node`` as (op, alpha, beta)."""
    directions = 2 if direction(graph, node) == "bidirectional" else 1
    names = [a.decode() if isinstance(a, bytes) else a for a in graph.attr(node, "activations", [])]
    return parse_activations(node.op_type, directions, names, list(graph.attr(node, "activation_alpha", [])),
                             list(graph.attr(node, "activation_beta", [])))


def parse_activations(kind: str, directions: int, names: list[str], alphas: list[float],
                      betas: list[float]) -> list[tuple[str, float | None, float | None]]:
    """The activations attributes of a ``kind`` node as (op, alpha, beta) per activation, per
    direction: alphas and betas are consumed in order by the activations that take them (ONNX
    Runtime's reading of the definition); no names: the op's defaults."""
    names = names or list(DEFAULT_ACTIVATIONS[kind]) * directions
    alphas, betas = list(alphas), list(betas)
    out = []
    for name in names:
        if name.lower() not in _ACTIVATIONS:
            raise ValueError(f"activation {name} is not an ONNX recurrent activation")
        op, alpha, beta = _ACTIVATIONS[name.lower()]
        if alpha is not None and alphas:
            alpha = float(alphas.pop(0))
        if beta is not None and betas:
            beta = float(betas.pop(0))
        out.append((op, alpha, beta))
    if len(out) != len(DEFAULT_ACTIVATIONS[kind]) * directions:
        raise ValueError(f"{len(out)} activations for {directions} direction(s)")
    return out


def direction(graph: Graph, node) -> str:
    direction = graph.attr(node, "direction", "forward")
    return direction.decode() if isinstance(direction, bytes) else direction
