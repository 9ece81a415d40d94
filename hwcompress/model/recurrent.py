"""What the ONNX recurrent ops (LSTM, GRU, RNN) are made of, read from a node's attributes, and
whether ``passes.unroll_recurrent`` can unroll one: TVM's ONNX frontend imports none of them, so
the loader accepts exactly those the pass can rewrite and refuses the others with the reason."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import Graph

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_OPS = frozenset(GATES)  # TVM imports none of them; passes.unroll_recurrent is how they compile
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# ONNX activation name -> (op, alpha default, beta default); None: the op takes no parameter.
_ACTIVATIONS = {"sigmoid": ("Sigmoid", None, None), "tanh": ("Tanh", None, None), "relu": ("Relu", None, None),
                "softsign": ("Softsign", None, None), "softplus": ("Softplus", None, None),
                "leakyrelu": ("LeakyRelu", 0.01, None), "thresholdedrelu": ("ThresholdedRelu", 1.0, None),
                "elu": ("Elu", 1.0, None), "hardsigmoid": ("HardSigmoid", 0.2, 0.5),
                "affine": ("Affine", 1.0, 0.0), "scaledtanh": ("ScaledTanh", 1.0, 1.0)}


def why_not_unrolled(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """Each recurrent node ``passes.unroll_recurrent`` would leave, with the reason (the loader
    refuses such models with it: TVM cannot import them either)."""
    nodes = [n for n in model.graph.node if n.op_type in GATES and n.domain in ("", "ai.onnx")]
    if not nodes:
        return []
    graph = Graph(onnx.shape_inference.infer_shapes(model))
    return [(node, why) for node in nodes if (why := why_not_unrollable(graph, node))]


def why_not_unrollable(graph: Graph, node) -> str | None:
    """Why ``node`` cannot be unrolled (a phrase for a user), or None where it can."""
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
            return "sequence_lens differ from the sequence length (per-entry lengths are not unrolled)"
    try:
        activations(graph, node)
    except ValueError as exc:
        return str(exc)
    return None


def activations(graph: Graph, node) -> list[tuple[str, float | None, float | None]]:
    """Per direction, each activation as (op, alpha, beta): alphas and betas are consumed in order
    by the activations that take them (ONNX Runtime's reading of the definition)."""
    directions = 2 if direction(graph, node) == "bidirectional" else 1
    names = [a.decode() if isinstance(a, bytes) else a for a in graph.attr(node, "activations", [])]
    names = names or list(DEFAULT_ACTIVATIONS[node.op_type]) * directions
    alphas = list(graph.attr(node, "activation_alpha", []))
    betas = list(graph.attr(node, "activation_beta", []))
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
    if len(out) != len(DEFAULT_ACTIVATIONS[node.op_type]) * directions:
        raise ValueError(f"{len(out)} activations for {directions} direction(s)")
    return out


def direction(graph: Graph, node) -> str:
    direction = graph.attr(node, "direction", "forward")
    return direction.decode() if isinstance(direction, bytes) else direction
