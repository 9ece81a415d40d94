"""Layer specs: what determines a Conv/Gemm/MatMul's latency on a target (op, attributes, shapes,
bias, dtype, and the elementwise ops TVM fuses into it), and the one-layer model that reproduces it.

With its epilogue (a constant bias Add, Relu, Clip, a residual Add) the one-layer model compiles to the
very kernel TVM builds for the layer inside the whole model, so timing it times the model's own kernel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..model import reference as ort
from ..model.graph import Graph
from ..model.summary import layer_macs
from ..passes.quantize import POW2_METADATA, ActivationStats, quantize

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerSpec:
    """What determines a layer's latency on a target (not its weights' values)."""

    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    attributes: tuple[tuple[str, Any], ...]
    bias: bool
    epilogue: tuple[tuple, ...] = ()  # ("Relu",), ("Clip",), ("Add",): residual R, ("AddConst", shape)
    dtype: str = "float32"  # or "int8/uint8", "int8/int8": int8 QDQ with that activation type, lowered;
    # or "pow2": power-of-two weights (a float layer to TVM; 4-bit codes to a cycle model)
    # The bounds of each Clip: not part of the entry (they do not change latency), but the one-layer
    # model keeps them, so its kernel is the model's own one and reuses the model's tuning records.
    clip_bounds: tuple[tuple[float, float], ...] = field(default=(), compare=False)
    # Multiply-accumulates: only the order in which a budgeted table times shapes, never a price.
    macs: int = field(default=0, compare=False)
    # A depthwise conv's 1x1 reader (``depthwise_reader``): a CPU build computes the two as one
    # kernel, so the one-layer model holds both, and the table's figure for this layer is the
    # pair's less the reader's alone (the reader is priced as itself).
    reader: "LayerSpec | None" = None

    def as_int8(self, symmetric_activations: bool) -> "LayerSpec":
        """The same layer quantized as the int8 pass would (per-channel weights, per-tensor input)."""
        return replace(self, dtype="int8/int8" if symmetric_activations else "int8/uint8",
                       reader=self.reader and self.reader.as_int8(symmetric_activations))

    def as_pow2(self) -> "LayerSpec":
        return replace(self, dtype="pow2", reader=None)

    def key(self) -> str:
        return json.dumps([self.op, self.input_shape, self.weight_shape, self.attributes, self.bias,
                           self.epilogue, self.dtype] + ([self.reader.key()] if self.reader else []),
                          separators=(",", ":"))

    def describe(self) -> str:
        tail = "".join(f"+{op[0]}" for op in self.epilogue)
        kind = "" if self.dtype == "float32" else f" [{self.dtype}]"
        pair = f" > {self.reader.describe()}" if self.reader else ""
        return (f"{self.op}{kind}{tail} {'x'.join(map(str, self.input_shape))} * "
                f"{'x'.join(map(str, self.weight_shape))}{pair}")

    @property
    def input_names(self) -> list[str]:
        own = ["X"] + (["R"] if any(op[0] == "Add" for op in self.epilogue) else [])
        return own + ([f"{_READER}R"] if self.reader and "R" in self.reader.input_names else [])

    def to_model(self, channels_last: bool = False) -> onnx.ModelProto:
        """The layer alone (with its reader, where it has one), with random weights of its shapes.
        ``channels_last``: a 2-D conv takes and returns NHWC tensors (``_channels_last``), for
        targets that compute convs in NHWC."""
        model = self._alone()
        if self.reader is not None:
            model = _chained(model, onnx.compose.add_prefix(self.reader._alone(), _READER))
        if channels_last and self.op == "Conv" and len(self.input_shape) == 4:
            model = _channels_last(model)
        return model

    def _alone(self) -> onnx.ModelProto:
        rng = np.random.default_rng(0)
        weight = onnx.numpy_helper.from_array(rng.standard_normal(self.weight_shape).astype(np.float32), "W")
        inits = [weight]
        inputs = ["X", "W"]
        if self.bias:
            channels = self.weight_shape[0] if self.op == "Conv" or dict(self.attributes).get("transB") else self.weight_shape[-1]
            inits.append(onnx.numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "B"))
            inputs.append("B")
        nodes = [helper.make_node(self.op, inputs, ["Y0"], name="layer", **dict(self.attributes))]
        graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, self.input_shape)]
        bounds = iter(self.clip_bounds)
        for i, op in enumerate(self.epilogue):
            extra = []
            if op[0] == "Add":
                extra = ["R"]
                graph_inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, None))
            elif op[0] == "AddConst":
                inits.append(onnx.numpy_helper.from_array(rng.standard_normal(op[1]).astype(np.float32), f"C{i}"))
                extra = [f"C{i}"]
            elif op[0] == "Clip":
                low, high = next(bounds, (0.0, 6.0))
                inits += [onnx.numpy_helper.from_array(np.array(low, np.float32), f"lo{i}"),
                          onnx.numpy_helper.from_array(np.array(high, np.float32), f"hi{i}")]
                extra = [f"lo{i}", f"hi{i}"]
            op_type = "Add" if op[0] == "AddConst" else op[0]
            nodes.append(helper.make_node(op_type, [f"Y{i}", *extra], [f"Y{i + 1}"], name=f"epilogue{i}"))
        nodes[-1].output[0] = "Y"
        graph = helper.make_graph(nodes, "layer", graph_inputs,
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        if len(graph_inputs) > 1:  # the residual input has the layer's output shape
            shape = next(v for v in model.graph.value_info if v.name == "Y0").type.tensor_type.shape
            model.graph.input[1].type.tensor_type.shape.CopyFrom(shape)
            model = onnx.shape_inference.infer_shapes(model)
        if self.dtype.startswith("int8"):
            model = self._quantized(model)
        if self.dtype == "pow2":  # a cycle model prices its weights as 4-bit codes
            model.metadata_props.add(key=POW2_METADATA, value=json.dumps(["layer"]))
        return model

    def _quantized(self, model: onnx.ModelProto) -> onnx.ModelProto:
        channels = self.input_shape[1] if self.op == "Conv" else self.input_shape[-1]
        stats = {"X": ActivationStats(-3.0, 3.0, np.zeros(channels))}
        return quantize.apply(model, stats=stats, scheme="int8", symmetric_activations=self.dtype == "int8/int8",
                              bias_correction=False).model

    def feeds(self, channels_last: bool = False) -> dict[str, np.ndarray]:
        return layer_feeds(self.to_model(channels_last))


def layer_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs to time a one-layer model (``LayerSpec.to_model``) on: random, fixed."""
    return ort.random_inputs(model, seed=1)


_READER = "r_"  # the names of a depthwise layer's reader in their one-layer model


def _chained(first: onnx.ModelProto, second: onnx.ModelProto) -> onnx.ModelProto:
    """``second`` (its names prefixed) reading ``first``'s output Y, and giving Y."""
    middle, graph = f"{_READER}X", first.graph
    for node in graph.node:
        node.output[:] = [middle if name == "Y" else name for name in node.output]
    for node in second.graph.node:
        node.output[:] = ["Y" if name == f"{_READER}Y" else name for name in node.output]
    graph.node.extend(second.graph.node)
    graph.initializer.extend(second.graph.initializer)
    graph.input.extend(v for v in second.graph.input if v.name != middle)
    del graph.value_info[:]
    graph.output[0].type.tensor_type.ClearField("shape")
    return onnx.shape_inference.infer_shapes(first)


def _channels_last(model: onnx.ModelProto) -> onnx.ModelProto:
    """The one-layer model with NHWC inputs and output: transposes to NCHW and back at its edges,
    which cancel the ones TVM's layout conversion to NHWC inserts, so the built model is the conv's
    kernel alone, as inside a whole model. With the edge transposes MobileNetV2's 112x112 expansion
    layer read 0.99 ms, 0.24 without: a table summing such figures priced channels of large
    activations four times what they cost in the model."""
    graph = Graph(model)
    first = graph.nodes[0]
    for value in graph.inputs:
        nchw = graph.unique_name(f"{value.name}_nchw")
        graph.replace_uses(value.name, nchw)
        graph.insert_before(first, [graph.make_node("Transpose", [value.name], [nchw], perm=[0, 3, 1, 2])])
        n, c, h, w = (d.dim_value for d in value.type.tensor_type.shape.dim)
        value.CopyFrom(helper.make_tensor_value_info(value.name, TensorProto.FLOAT, [n, h, w, c]))
    graph.append_after(graph.producer(graph.output_names[0]), "Transpose", [], "to_nhwc", perm=[0, 2, 3, 1])
    return graph.to_model()


def layer_spec(graph: Graph, node: onnx.NodeProto) -> LayerSpec | None:
    """The spec of a Conv/Gemm/MatMul with a constant weight and a static input shape, else None."""
    if node.op_type not in LAYER_OPS or len(node.input) < 2 or not graph.is_constant(node.input[1]):
        return None
    shape = graph.shape(node.input[0])
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    weight_shape = tuple(graph.initializer(node.input[1]).shape)
    attributes = _canonical_attributes(node, weight_shape)
    bias = len(node.input) > 2 and bool(node.input[2])
    epilogue, clip_bounds, tensor = _epilogue(graph, node)
    reader = depthwise_reader(graph, node, weight_shape, dict(attributes), epilogue, tensor)
    return LayerSpec(node.op_type, tuple(shape), weight_shape, attributes, bias, epilogue, clip_bounds=clip_bounds,
                     macs=layer_macs(graph, node) or 0, reader=reader and layer_spec(graph, reader))


def depthwise_reader(graph: Graph, node: onnx.NodeProto, weight_shape: tuple[int, ...], attributes: dict,
                     epilogue, tensor: str) -> onnx.NodeProto | None:
    """The 1x1 conv that alone reads a depthwise conv's output (after its activation), which a CPU
    build computes in the same kernel (``backend/depthwise_pointwise.py``): timed apart, the
    depthwise layer wrote and the 1x1 read an activation that the merged kernel keeps in a tile,
    and MobileNetV2's expansion channels were priced at half to three times what they save."""
    group = attributes.get("group", 1)
    if (node.op_type != "Conv" or len(weight_shape) != 4 or weight_shape[1] != 1 or group != weight_shape[0]
            or group == 1 or any(op[0] == "Add" for op in epilogue) or tensor in graph.output_names):
        return None
    user = graph.sole_consumer(tensor)
    if user is None or user.op_type != "Conv" or user.input[0] != tensor or len(user.input) < 2 \
            or not graph.is_constant(user.input[1]):
        return None
    shape = tuple(graph.initializer(user.input[1]).shape)
    attributes = dict(_canonical_attributes(user, shape))
    if len(shape) != 4 or shape[2:] != (1, 1) or attributes["group"] != 1 or set(attributes["strides"]) != {1}:
        return None
    return user


def _canonical_attributes(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    """Attributes with ONNX's defaults filled in and the implied ones dropped, so that layers that
    differ only in how their attributes are spelled share one table entry."""
    given = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
    if node.op_type == "Conv":
        count = len(weight_shape) - 2
        defaults = {"group": 1, "strides": (1,) * count, "dilations": (1,) * count, "pads": (0,) * 2 * count,
                    "auto_pad": "NOTSET"}
        given.pop("kernel_shape", None)  # the weight's shape says it
    elif node.op_type == "Gemm":
        defaults = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    else:
        defaults = {}
    return tuple(sorted((defaults | given).items()))


def _epilogue(graph: Graph, node: onnx.NodeProto) -> tuple[tuple[tuple, ...], tuple[tuple[float, float], ...], str]:
    """The elementwise ops after the layer that TVM fuses into its kernel, the Clips' bounds, and the
    tensor the last of them writes."""
    ops: list[tuple] = []
    bounds: list[tuple[float, float]] = []
    tensor = node.output[0]
    while len(ops) < 3:
        user = graph.sole_consumer(tensor)
        if user is None or tensor in graph.output_names:
            break
        if user.op_type == "Relu":
            ops.append(("Relu",))
        elif (user.op_type == "Clip" and len(user.input) == 3
              and all(graph.is_constant(i) for i in user.input[1:])):
            ops.append(("Clip",))
            bounds.append((float(graph.initializer(user.input[1])), float(graph.initializer(user.input[2]))))
        elif (user.op_type == "Add" and not any(graph.is_constant(i) for i in user.input)
              and graph.shape(user.input[0]) == graph.shape(user.input[1])):
            ops.append(("Add",))
        elif user.op_type == "Add" and sum(graph.is_constant(i) for i in user.input) == 1:  # a bias
            constant = next(i for i in user.input if graph.is_constant(i))
            ops.append(("AddConst", tuple(graph.initializer(constant).shape)))
        else:
            break
        tensor = user.output[0]
    return tuple(ops), tuple(bounds), tensor


def model_layers(model: onnx.ModelProto) -> dict[str, LayerSpec]:
    """Every timed layer of a model, by node name."""
    graph = Graph(model)
    graph.infer_shapes()
    specs = {n.name: layer_spec(graph, n) for n in graph.nodes}
    return {name: spec for name, spec in specs.items() if spec is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value
