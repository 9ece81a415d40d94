"""float16: weights and activations in half precision, what a GPU's tensor cores take.

Every float32 layer computes in float16 except the ops where half precision loses too much
(softmax, reductions, normalizations, exp/pow: long sums and wide ranges) and the layers the caller
keeps (``keep_fp32``: those whose measured error is too large). The graph's inputs and outputs stay
float32, so the model is a drop-in replacement; Casts are inserted where a float16 and a float32
region meet, one per tensor and type. Approximate: about 3 decimal digits per value, so outputs are
checked against the float32 model with ONNX Runtime within a stated tolerance
(``compress.quantize``). Written here rather than taken from onnxconverter-common, whose converter
left a Resize output in float16 with its inputs and outputs meant to stay float32.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from ..errors import HwcError
from ..model.graph import Graph
from .base import PassLog, model_pass

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

# Computed in float32 whatever the caller asks: sums over many values and wide-range functions, and
# ops whose output type comes from an attribute this pass does not rewrite.
STAY_FLOAT32_OPS = frozenset({
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "LayerNormalization", "InstanceNormalization",
    "GroupNormalization", "LpNormalization", "Exp", "Log", "Pow", "CumSum", "Range",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
    "QuantizeLinear", "DequantizeLinear", "NonMaxSuppression", "RoiAlign",
})
# Inputs that ONNX types as float32 only, whatever the node computes in.
FLOAT32_ONLY_INPUTS = {"Resize": {2}, "Upsample": {1}}
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


@model_pass
def float16(graph: Graph, log: PassLog, keep_fp32: tuple[str, ...] = (), simulate: bool = False) -> None:
    """Compute every float32 node in float16 but ``STAY_FLOAT32_OPS`` and ``keep_fp32`` (node names).

    ``simulate``: the same decisions in a float32 model whose weights and float16 values are rounded
    to float16 (a Cast there and back after each float16 node). ONNX Runtime's CPU kernels compute
    most float16 ops in float32 and drop the casts around them, so on the float16 model itself it
    sees the weights' rounding only (MobileNetV2: the same error as rounding the weights alone);
    the simulation rounds every value where the device does, for measuring each layer's error."""
    flow = [n.name for n in graph.nodes if n.op_type in CONTROL_FLOW]
    if flow:
        raise HwcError(f"float16 does not convert models with control flow ({', '.join(flow[:3])})")
    types = _element_types(graph)
    is_float = lambda tensor: types.get(tensor) == FLOAT  # noqa: E731
    half_nodes = {n.name for n in graph.nodes
                  if n.op_type not in STAY_FLOAT32_OPS and n.name not in keep_fp32
                  and any(is_float(t) for t in [*n.input, *n.output] if t)}
    produced_half = {t for n in graph.nodes if n.name in half_nodes for t in n.output if is_float(t)}
    half_constants: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}

    def as_type(tensor: str, want: int, reader) -> str:
        have = HALF if tensor in produced_half else FLOAT
        if have == want or (simulate and have == HALF):  # simulated float16 values are rounded float32
            return tensor
        if tensor in graph.initializers and want == HALF:
            if tensor not in half_constants:
                value = graph.initializers[tensor].astype(np.float16)
                half_constants[tensor] = graph.add_initializer(f"{tensor}_fp16", value.astype(np.float32) if simulate else value)
            return half_constants[tensor]
        if (tensor, want) not in casts:
            casts[(tensor, want)] = graph.unique_name(f"{tensor}_{'fp16' if want == HALF else 'fp32'}")
            rounded = [graph.make_node("Cast", [tensor], [casts[(tensor, want)]], to=want)]
            if simulate:
                rounded = _round_trip(graph, tensor, casts[(tensor, want)])
            graph.insert_before(reader, rounded)
        return casts[(tensor, want)]

    for node in list(graph.nodes):
        half = node.name in half_nodes
        float32_only = FLOAT32_ONLY_INPUTS.get(node.op_type, set())
        for i, tensor in enumerate(node.input):
            if tensor and is_float(tensor):
                graph.set_input(node, i, as_type(tensor, HALF if half and i not in float32_only else FLOAT, node))
        if half and not simulate:
            _retype_attributes(graph, node)
        elif half:
            for i, tensor in enumerate(node.output):
                if tensor in produced_half:
                    inner = graph.unique_name(f"{tensor}_unrounded")
                    node.output[i] = inner
                    graph.insert_before(node, _round_trip(graph, inner, tensor))  # placed by the topological sort
    if simulate:
        produced_half = set()  # every value is float32 now: nothing to cast back at the outputs
    for name in graph.output_names:  # outputs stay float32 under their names
        producer = graph.producer(name)
        if name in produced_half and producer is not None:
            inner = graph.unique_name(f"{name}_fp16")
            producer.output[list(producer.output).index(name)] = inner
            graph.replace_uses(name, inner)
            graph.nodes.append(graph.make_node("Cast", [inner], [name], to=FLOAT))
            graph.forget_shapes([name])
            casts[(inner, FLOAT)] = name
    graph.forget_shapes(produced_half)
    kept = sorted(n.name for n in graph.nodes if n.op_type in STAY_FLOAT32_OPS or n.name in keep_fp32)
    log.applied.append(f"{len(half_nodes)} nodes in float16, {len(half_constants)} weights stored as float16, "
                       f"{len(casts)} casts between float16 and float32")
    log.skipped.extend(f"{name}: kept float32" for name in kept)
    log.details["float32_nodes"] = kept


def _element_types(graph: Graph) -> dict[str, int]:
    """Every tensor's element type, from shape inference on the current graph."""
    model = graph.to_model()
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _retype_attributes(graph: Graph, node) -> None:
    """Attributes that name a float32 output type: a Cast to float32, ConstantOfShape's value."""
    if node.op_type == "Cast" and graph.attr(node, "to") == FLOAT:
        graph.set_attr(node, "to", HALF)
    elif node.op_type == "ConstantOfShape":
        value = graph.attr(node, "value")
        if value is not None and value.data_type == FLOAT:
            graph.set_attr(node, "value", numpy_helper.from_array(numpy_helper.to_array(value).astype(np.float16)))


def _round_trip(graph: Graph, tensor: str, rounded: str) -> list:
    """Nodes that give ``rounded``: ``tensor`` rounded to float16 and back to float32."""
    half = graph.unique_name(f"{rounded}_half")
    return [graph.make_node("Cast", [tensor], [half], to=HALF), graph.make_node("Cast", [half], [rounded], to=FLOAT)]
