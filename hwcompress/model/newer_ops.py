"""Ops of opsets after 17 that ONNX's version converter cannot bring back to 17, written as the
opset-17 ops they equal before the conversion.

hwc canonicalizes every model to opset 17. The converter has no 18 -> 17 adapter for Split (so
every Split of a model exported at opset 18 or later: YOLOv8's C2f blocks, chunked attention
projections) and no earlier version of Mish (18), GroupNormalization (18, 21) or Gelu (20): such
models were refused ("cannot convert opset 18 to 17"). Here, first:

- Split: one Slice per output (the sizes from its ``split`` input, or its ``num_outputs`` and the
  input's static shape, the last chunk the smaller as opset 18 has it); exact.
- Gelu: its formula, erf or tanh (``approximate``); Mish: ``x * tanh(softplus(x))``.
- GroupNormalization: Reshape to [N, groups, -1], InstanceNormalization, Reshape back, then the
  scale and shift per channel (opset 18 gives them per group: each repeated over its channels).
- Pad (no 18 -> 17 adapter), ConstantOfShape (none below 20), LpPool (none to 17), GridSample
  (none below 20) and GlobalMaxPool (none below 22), used as opset 17 allows (Pad's ``axes``
  input spread into its pads, GridSample's modes by their opset-16 names), are parked in a
  private domain while the converter runs and restored after it (``park`` / ``unpark``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..errors import HwcError
from .graph import Graph

LAST_VERSION = 17  # the opset these rewrites target
PARKED_DOMAIN = "hwc.parked"  # where ops the converter cannot take wait while it runs
_PARKED_OPS = ("Pad", "ConstantOfShape", "LpPool", "GridSample", "GlobalMaxPool")
_GRID_SAMPLE_MODES = {"linear": "bilinear", "cubic": "bicubic"}  # opset 20's names -> 16's


def rewrite_newer_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its Split, Gelu, Mish and GroupNormalization nodes written in opset-17 ops,
    where its opset is later than 17 (else ``model`` itself)."""
    rewrites = {"Split": _split, "Gelu": _gelu, "Mish": _mish, "GroupNormalization": _group_norm}
    found = _later_opset_graph(model, rewrites)
    if found is None:
        return model
    graph, nodes, _ = found
    for node in nodes:
        graph.replace_node(node, rewrites[node.op_type](graph, node))
    return graph.to_model()


def _later_opset_graph(model: onnx.ModelProto, ops) -> tuple | None:
    """(the model's ``Graph``, shapes inferred where they can be, its nodes of ``ops``, its opset)
    where its opset is later than 17 and it has such nodes; else None."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), LAST_VERSION)
    if version <= LAST_VERSION or not any(n.op_type in ops and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return None
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shapes are needed only for some nodes (Split's sizes, a Pad's rank): reported there
        pass
    graph = Graph(model)
    return graph, [n for n in graph.nodes if n.op_type in ops and n.domain in ("", "ai.onnx")], version


def _split(graph: Graph, node) -> list:
    axis = graph.attr(node, "axis", 0)
    shape = graph.shape(node.input[0])
    outputs = [o for o in node.output]
    if len(node.input) > 1 and node.input[1]:
        sizes = graph.initializer(node.input[1])
        if sizes is None:
            raise HwcError(f"Split {node.name!r}: its sizes are computed at run time; hwc needs them constant")
        sizes = [int(s) for s in sizes]
    else:
        if not shape or not isinstance(shape[axis], int):
            raise HwcError(f"Split {node.name!r}: the size of the axis it splits is not known")
        extent, count = shape[axis], graph.attr(node, "num_outputs", len(outputs))
        chunk = math.ceil(extent / count)
        sizes = [chunk] * (count - 1) + [extent - chunk * (count - 1)]
    slices, start = [], 0
    for output, size in zip(outputs, sizes):
        if output:
            inputs = [node.input[0]] + [graph.add_initializer(hint, np.array([value], np.int64))
                                        for hint, value in (("starts", start), ("ends", start + size), ("axes", axis))]
            slices.append(graph.make_node("Slice", inputs, [output], name=f"{node.name}_{len(slices)}"))
        start += size
    return slices


def _scalar(graph: Graph, value: float) -> str:
    return graph.add_initializer("c", np.array(value, np.float32))


def _gelu(graph: Graph, node) -> list:
    x, y = node.input[0], node.output[0]

    def tmp(hint):
        return graph.unique_name(f"{node.name}_{hint}")

    names = {k: tmp(k) for k in ("a", "b", "c", "d", "e", "f", "g")}
    if graph.attr(node, "approximate", b"none") in (b"tanh", "tanh"):
        return [graph.make_node("Pow", [x, _scalar(graph, 3.0)], [names["a"]], name=names["a"]),
                graph.make_node("Mul", [names["a"], _scalar(graph, 0.044715)], [names["b"]], name=names["b"]),
                graph.make_node("Add", [x, names["b"]], [names["c"]], name=names["c"]),
                graph.make_node("Mul", [names["c"], _scalar(graph, math.sqrt(2 / math.pi))], [names["d"]], name=names["d"]),
                graph.make_node("Tanh", [names["d"]], [names["e"]], name=names["e"]),
                graph.make_node("Add", [names["e"], _scalar(graph, 1.0)], [names["f"]], name=names["f"]),
                graph.make_node("Mul", [x, names["f"]], [names["g"]], name=names["g"]),
                graph.make_node("Mul", [names["g"], _scalar(graph, 0.5)], [y], name=node.name)]
    return [graph.make_node("Div", [x, _scalar(graph, math.sqrt(2))], [names["a"]], name=names["a"]),
            graph.make_node("Erf", [names["a"]], [names["b"]], name=names["b"]),
            graph.make_node("Add", [names["b"], _scalar(graph, 1.0)], [names["c"]], name=names["c"]),
            graph.make_node("Mul", [x, names["c"]], [names["d"]], name=names["d"]),
            graph.make_node("Mul", [names["d"], _scalar(graph, 0.5)], [y], name=node.name)]


def _mish(graph: Graph, node) -> list:
    softplus, tanh = graph.unique_name(f"{node.name}_softplus"), graph.unique_name(f"{node.name}_tanh")
    return [graph.make_node("Softplus", [node.input[0]], [softplus], name=softplus),
            graph.make_node("Tanh", [softplus], [tanh], name=tanh),
            graph.make_node("Mul", [node.input[0], tanh], [node.output[0]], name=node.name)]


def _group_norm(graph: Graph, node) -> list:
    x, scale, bias = node.input[:3]
    shape = graph.shape(x)
    groups = graph.attr(node, "num_groups")
    weights = [graph.initializer(scale), graph.initializer(bias)]
    if not shape or not all(isinstance(d, int) for d in shape) or any(w is None for w in weights):
        raise HwcError(f"GroupNormalization {node.name!r}: hwc needs its input shape and its scale and bias constant")
    channels = shape[1]
    # Opset 18 (and 20) give the scale and shift per group; 21 per channel.
    per_channel = [np.repeat(w, channels // groups) if w.size == groups and groups != channels else w for w in weights]
    flat, normed, back, scaled = (graph.unique_name(f"{node.name}_{h}") for h in ("flat", "normed", "back", "scaled"))
    per_channel_shape = [channels] + [1] * (len(shape) - 2)
    return [graph.make_node("Reshape", [x, graph.add_initializer("shape", np.array([shape[0], groups, -1], np.int64))],
                            [flat], name=flat),
            graph.make_node("InstanceNormalization", [flat, graph.add_initializer("ones", np.ones(groups, np.float32)),
                                                      graph.add_initializer("zeros", np.zeros(groups, np.float32))],
                            [normed], name=normed, epsilon=graph.attr(node, "epsilon", 1e-5)),
            graph.make_node("Reshape", [normed, graph.add_initializer("shape", np.array(shape, np.int64))], [back],
                            name=back),
            graph.make_node("Mul", [back, graph.add_initializer("scale", per_channel[0].reshape(per_channel_shape)
                                                                .astype(np.float32))], [scaled], name=scaled),
            graph.make_node("Add", [scaled, graph.add_initializer("bias", per_channel[1].reshape(per_channel_shape)
                                                                  .astype(np.float32))], [node.output[0]],
                            name=node.name)]


def park(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (opset after 17) with its nodes of ``_PARKED_OPS`` in opset-17 form and moved to
    ``PARKED_DOMAIN``, out of the version converter's way; ``model`` itself where it has none."""
    found = _later_opset_graph(model, _PARKED_OPS)
    if found is None:
        return model
    graph, nodes, version = found
    for node in nodes:
        if node.op_type == "Pad":
            _pad_in_opset_17_form(graph, node)
        elif node.op_type == "LpPool" and graph.attr(node, "ceil_mode", 0):
            raise HwcError(f"LpPool {node.name!r}: ceil_mode (opset 18) has no opset-17 form")
        elif node.op_type == "GridSample" and version >= 20:
            mode = graph.attr(node, "mode", b"linear")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            graph.set_attr(node, "mode", _GRID_SAMPLE_MODES.get(mode, mode))
        node.domain = PARKED_DOMAIN
    parked = graph.to_model(infer=False)
    parked.opset_import.append(onnx.helper.make_opsetid(PARKED_DOMAIN, 1))
    return parked


def unpark(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the nodes ``park`` moved back in the default domain."""
    if not any(o.domain == PARKED_DOMAIN for o in model.opset_import):
        return model
    for node in model.graph.node:
        if node.domain == PARKED_DOMAIN:
            node.domain = ""
            attrs = [a for a in node.attribute if a.name != "ceil_mode"]
            del node.attribute[:]
            node.attribute.extend(attrs)
    kept = [o for o in model.opset_import if o.domain != PARKED_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def _pad_in_opset_17_form(graph: Graph, node) -> None:
    """A Pad's ``axes`` input (opset 18) spread into a pad per axis; ``wrap`` (19) refused."""
    mode = graph.attr(node, "mode", b"constant")
    if mode in (b"wrap", "wrap"):
        raise HwcError(f"Pad {node.name!r}: mode 'wrap' (opset 19) has no opset-17 form")
    if len(node.input) < 4 or not node.input[3]:
        return
    pads, axes, rank = graph.initializer(node.input[1]), graph.initializer(node.input[3]), graph.rank(node.input[0])
    if pads is None or axes is None or rank is None:
        raise HwcError(f"Pad {node.name!r}: hwc needs its pads and axes constant and its input's rank known")
    full = np.zeros(2 * rank, np.int64)
    for i, axis in enumerate(int(a) % rank for a in axes):
        full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
    graph.set_input(node, 1, graph.add_initializer("pads", full))
    del node.input[3:]
