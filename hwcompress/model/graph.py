"""A mutable view of an ONNX graph that every pass works on.

Passes never edit protobuf lists: they ask this view who produces or consumes a tensor, read
initializers as numpy arrays, and replace nodes or initializers through its methods. ``to_model``
writes a valid model back: nodes in topological order, unused initializers dropped, and every
intermediate shape inferred afresh so that ``value_info`` never describes a tensor as it was.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Iterable, Sequence

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import HwcError


class Graph:
    """Nodes, initializers (numpy) and the producer/consumer index of one ONNX model."""

    def __init__(self, model: onnx.ModelProto):
        self._template = copy.deepcopy(model)
        del self._template.graph.node[:]
        del self._template.graph.initializer[:]
        del self._template.graph.value_info[:]
        g = model.graph
        self.initializers: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.inputs = [copy.deepcopy(v) for v in g.input if v.name not in self.initializers]
        self.outputs = [copy.deepcopy(v) for v in g.output]
        self._value_info = {v.name: copy.deepcopy(v) for v in itertools.chain(g.value_info, g.output)}
        self.nodes: list[onnx.NodeProto] = []
        self._names: set[str] = set()
        self._taken: set[str] | None = None
        self._counter = itertools.count()
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and _constant_value(node) is not None:
                self.initializers[node.output[0]] = _constant_value(node)
            else:
                self.nodes.append(copy.deepcopy(node))
        for node in self.nodes:
            if not node.name or node.name in self._names:
                node.name = self.unique_name(node.op_type)
            self._names.add(node.name)
        self._taken = None
        self._index_dirty = True

    # ----------------------------------------------------------------- queries
    @property
    def opset(self) -> int:
        return next((o.version for o in self._template.opset_import if o.domain in ("", "ai.onnx")), 0)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        self._reindex()
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        self._reindex()
        return list(self._consumers.get(tensor, ()))

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The only reader of ``tensor``, or None if it has several or is a graph output."""
        users = self.consumers(tensor)
        if len(users) == 1 and tensor not in self.output_names:
            return users[0]
        return None

    def node(self, name: str) -> onnx.NodeProto:
        self._reindex()
        return self._by_name[name]

    def initializer(self, tensor: str) -> np.ndarray | None:
        return self.initializers.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.initializers

    def shape(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """Static shape if known: ints, or dim names/None for unknown dimensions."""
        if tensor in self.initializers:
            return tuple(self.initializers[tensor].shape)
        info = self._value_info.get(tensor) or next((v for v in self.inputs if v.name == tensor), None)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in info.type.tensor_type.shape.dim)

    def dtype(self, tensor: str) -> np.dtype | None:
        """Element type if known."""
        if tensor in self.initializers:
            return self.initializers[tensor].dtype
        info = self._value_info.get(tensor) or next((v for v in self.inputs if v.name == tensor), None)
        if info is None or not info.type.tensor_type.elem_type:
            return None
        return np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))

    def rank(self, tensor: str) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def attr(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def topological_order(self) -> list[onnx.NodeProto]:
        """Nodes sorted so that producers come first; ties keep the original order."""
        dag = self.to_networkx()
        position = {n.name: i for i, n in enumerate(self.nodes)}
        order = nx.lexicographical_topological_sort(dag, key=lambda name: position[name])
        self._reindex()
        return [self._by_name[name] for name in order]

    def to_networkx(self) -> nx.DiGraph:
        """A DAG keyed by node name; each edge carries the tensor that links the two nodes."""
        self._reindex()
        dag = nx.DiGraph()
        for node in self.nodes:
            dag.add_node(node.name, op_type=node.op_type)
        for node in self.nodes:
            for tensor in node.input:
                src = self._producer.get(tensor)
                if src is not None:
                    dag.add_edge(src.name, node.name, tensor=tensor)
        if not nx.is_directed_acyclic_graph(dag):
            raise HwcError("the graph has a cycle; it is not a valid ONNX model")
        return dag

    # --------------------------------------------------------------- mutations
    def unique_name(self, hint: str) -> str:
        hint = hint or "t"
        taken = self._all_names()
        if hint not in taken:
            self._names.add(hint)
            taken.add(hint)
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in taken:
                self._names.add(name)
                taken.add(name)
                return name

    def make_node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str],
                  name: str | None = None, domain: str = "", **attrs: Any) -> onnx.NodeProto:
        """Build a node with a unique name; place it with ``insert_before`` or ``replace_node``."""
        return helper.make_node(op_type, list(inputs), list(outputs),
                                name=self.unique_name(name or op_type), domain=domain or None, **attrs)

    def add_initializer(self, hint: str, array: np.ndarray) -> str:
        """Store ``array`` under a fresh name derived from ``hint`` and return that name."""
        name = self.unique_name(hint)
        self.initializers[name] = np.asarray(array)
        return name

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        """Replace the value of an existing initializer (its shape may change)."""
        self.initializers[name] = np.asarray(array)
        self._value_info.pop(name, None)

    def set_input(self, node: onnx.NodeProto, index: int, tensor: str) -> None:
        """Make input ``index`` of ``node`` read ``tensor``."""
        node.input[index] = tensor
        self._mark_dirty()

    def set_constant_input(self, node: onnx.NodeProto, index: int, array: np.ndarray, hint: str) -> None:
        """Feed input ``index`` of ``node`` from a new initializer; the old one may be shared."""
        name = self.add_initializer(f"{node.name}_{hint}", array)
        while len(node.input) <= index:
            node.input.append("")
        self.set_input(node, index, name)

    def append_after(self, node: onnx.NodeProto, op_type: str, other_inputs: Sequence[str], name: str,
                     **attrs: Any) -> onnx.NodeProto:
        """Insert ``op_type(node's output, *other_inputs)`` that takes over the output's name and readers."""
        out = node.output[0]
        inner = self.unique_name(f"{out}_before_{op_type.lower()}")
        node.output[0] = inner
        self._value_info.pop(out, None)
        new = self.make_node(op_type, [inner, *other_inputs], [out], name=name, **attrs)
        self.nodes.insert(self._position(node) + 1, new)
        self._mark_dirty()
        return new

    def set_attr(self, node: onnx.NodeProto, name: str, value: Any) -> None:
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        node.attribute.append(helper.make_attribute(name, value))

    def insert_before(self, anchor: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        at = self._position(anchor)
        self.nodes[at:at] = list(new_nodes)
        self._mark_dirty()

    def insert_after(self, anchor: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        at = self._position(anchor) + 1
        self.nodes[at:at] = list(new_nodes)
        self._mark_dirty()

    def replace_node(self, old: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        at = self._position(old)
        self.nodes[at:at + 1] = list(new_nodes)
        self._mark_dirty()

    def remove_node(self, node: onnx.NodeProto) -> None:
        del self.nodes[self._position(node)]
        self._mark_dirty()

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of tensor ``old`` read ``new`` instead (graph outputs excluded)."""
        for node in self.consumers(old):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        self._mark_dirty()

    def rename_tensor(self, old: str, new: str) -> None:
        """Rename a tensor everywhere: its producer, its readers and the graph outputs."""
        producer = self.producer(old)
        if producer is not None:
            producer.output[list(producer.output).index(old)] = new
        self.replace_uses(old, new)
        for v in self.outputs:
            if v.name == old:
                v.name = new
        if old in self.initializers:
            self.initializers[new] = self.initializers.pop(old)
        self._value_info.pop(old, None)
        self._mark_dirty()

    def bypass(self, node: onnx.NodeProto, through: str | None = None) -> bool:
        """Remove a node whose output equals one of its inputs (``through``, default the first).

        When the node's output is a graph output the producer of ``through`` is renamed to keep the
        output's name. Returns False, changing nothing, where neither can be done.
        """
        source = through if through is not None else node.input[0]
        out = node.output[0]
        if out not in self.output_names:
            self.remove_node(node)
            self.replace_uses(out, source)
            return True
        producer = self.producer(source)
        if producer is None or source in self.output_names or source in self.input_names:
            return False
        self.remove_node(node)
        self.rename_tensor(source, out)
        return True

    def forget_shapes(self, tensors: Iterable[str]) -> None:
        """Drop recorded shapes of tensors a pass changed; ``infer_shapes`` recomputes them."""
        for t in tensors:
            self._value_info.pop(t, None)

    def infer_shapes(self) -> None:
        """Recompute every intermediate shape from the current nodes."""
        model = self.to_model()
        self._value_info = {v.name: v for v in itertools.chain(model.graph.value_info, model.graph.output)}

    # ------------------------------------------------------------------ output
    def set_metadata(self, key: str, value: str) -> None:
        """A model-level note (``metadata_props``) that travels with the model through later passes."""
        props = self._template.metadata_props
        for prop in props:
            if prop.key == key:
                prop.value = value
                return
        props.add(key=key, value=value)

    def to_model(self, infer: bool = True) -> onnx.ModelProto:
        """A fresh ModelProto: topologically sorted, unused initializers dropped, shapes inferred."""
        model = copy.deepcopy(self._template)
        g = model.graph
        g.node.extend(copy.deepcopy(n) for n in self.topological_order())
        used = {t for n in self.nodes for t in n.input} | set(self.output_names)
        for name, array in self.initializers.items():
            if name in used:
                g.initializer.append(numpy_helper.from_array(array, name))
        del g.input[:]
        g.input.extend(copy.deepcopy(self.inputs))
        del g.output[:]
        for v in self.outputs:
            out = copy.deepcopy(v)
            if self.producer(v.name) is not None and v.name not in self._value_info:
                out.type.tensor_type.ClearField("shape")
            g.output.append(out)
        if infer:
            try:
                model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            except (onnx.shape_inference.InferenceError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
                raise HwcError(f"shape inference failed after rewriting the graph: {exc}") from exc
        return model

    # ---------------------------------------------------------------- private
    def _all_names(self) -> set[str]:
        """Every name in use or handed out; kept between edits that go through the methods above
        (a pass emitting thousands of nodes would otherwise rescan the graph per name)."""
        if self._taken is None:
            self._taken = set(self._names) | set(self.initializers) | set(self.input_names) | set(self.output_names)
            for n in self.nodes:
                self._taken.update(n.output)
        return self._taken

    def _position(self, node: onnx.NodeProto) -> int:
        for i, candidate in enumerate(self.nodes):
            if candidate is node:
                return i
        raise KeyError(f"node {node.name} is not in the graph")

    def _mark_dirty(self) -> None:
        self._index_dirty = True
        self._taken = None

    def _reindex(self) -> None:
        if not self._index_dirty:
            return
        self._producer: dict[str, onnx.NodeProto] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        self._by_name: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            self._by_name[node.name] = node
            for t in node.output:
                if t:
                    self._producer[t] = node
            for t in node.input:
                if t:
                    self._consumers.setdefault(t, []).append(node)
        self._index_dirty = False


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for forms we leave as nodes (sparse tensors)."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.array(helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_floats" else np.int64)
    return None
