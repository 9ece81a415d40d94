"""Which channels of a graph must be removed together: the dependency analysis behind pruning.

Every channel of every activation is described by an *atom*: channel k of the layer (Conv, Gemm,
MatMul) that produced it, or of a graph input. Walking the graph in topological order, each op maps
the atoms of its inputs to those of its outputs:

- ops that keep channels (activations, BatchNormalization, per-channel Mul/Add, pooling,
  depthwise Conv) pass them through;
- Concat on the channel axis concatenates them, Split cuts them;
- Flatten repeats each channel's atom over the H*W features it becomes, so a Gemm after it loses
  input features in blocks;
- elementwise ops on two activations (residual Add, Mul, Sum) *couple* their inputs: the atoms at
  the same position are unified (union-find), so they can only be removed together;
- anything else (Reshape that mixes channels, Transpose, grouped Conv, a graph output, ...) *blocks*
  the atoms it sees, with the reason.

Channels are axis 1 (NCHW, and a Gemm's [batch, features]), except where a MatMul with constant
weights reads a sequence ([batch, steps, features]: a transformer's MLP, a speech or OCR model's
head): its output's channels are the last axis, and only elementwise ops carry them further (the
hidden features of ``fc1 -> GELU -> fc2`` are a group).

A class of unified atoms is one removable unit; the layers its atoms come from form a group whose
channel counts change together. This is the mechanism of Torch-Pruning's dependency graph, written
for ONNX with one rule table instead of special cases per architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..model.graph import Graph

# Ops whose output channel c depends only on input channel c (extra inputs, if any, are constants).
CHANNEL_WISE = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Softplus", "Gelu", "Mish", "Neg", "Abs", "Exp", "Sqrt", "Identity", "Dropout", "Cast",
    "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize", "Upsample", "Mul", "Add", "Sub", "Div",
    "Sum", "Max", "Min", "Mean", "Pad", "Erf", "Log", "Reciprocal", "Pow", "Sin", "Cos", "Softsign", "Celu",
    "ThresholdedRelu", "Shrink", "Floor", "Ceil", "Round", "Sign",
}
ELEMENTWISE_MULTI = {"Mul", "Add", "Sub", "Div", "Sum", "Max", "Min", "Mean"}
# What carries a sequence's features (channels on the last axis): ops that act on each value alone.
ELEMENTWISE = CHANNEL_WISE - {"BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool",
                              "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize",
                              "Upsample", "Pad"}


@dataclass
class Source:
    """A layer whose output channels are atoms: ``offset .. offset+channels-1``."""

    node: str
    op_type: str
    channels: int
    offset: int
    prunable: bool = True


@dataclass
class Action:
    """A rewrite to apply once the kept atoms are known."""

    kind: str          # "out", "in", "depthwise", "param", "split"
    node: str
    atoms: np.ndarray  # atom ids along the sliced axis, in order
    input_index: int = 1
    axis: int = 0

    def channels(self) -> np.ndarray:
        """The atoms once per channel: a Flatten before a Gemm repeats each over its features."""
        if len(self.atoms) < 2:
            return self.atoms
        return self.atoms[np.r_[True, self.atoms[1:] != self.atoms[:-1]]]


@dataclass
class ChannelGraph:
    """The result of the analysis: atoms per tensor, unions, blocks and pending rewrites."""

    sources: list[Source] = field(default_factory=list)
    atoms: dict[str, np.ndarray] = field(default_factory=dict)
    last_axis: set[str] = field(default_factory=set)  # tensors whose atoms are features on the last axis
    parent: list[int] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)

    # -- union-find
    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def block(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is None:
            return
        for a in np.unique(atoms).tolist():
            self.blocked.setdefault(a, reason)

    def new_source(self, node: str, op_type: str, channels: int, prunable: bool = True) -> np.ndarray:
        offset = len(self.parent)
        self.sources.append(Source(node, op_type, channels, offset, prunable))
        self.parent.extend(range(offset, offset + channels))
        return np.arange(offset, offset + channels)

    def source_of(self, atom: int) -> Source:
        for s in self.sources:
            if s.offset <= atom < s.offset + s.channels:
                return s
        raise KeyError(atom)

    def classes(self) -> dict[int, list[int]]:
        """Atoms grouped by their union-find root."""
        out: dict[int, list[int]] = {}
        for a in range(len(self.parent)):
            out.setdefault(self.find(a), []).append(a)
        return out

    def coupled_layers(self) -> list[list[str]]:
        """Prunable layers that lose channels together (a residual group, a Concat's inputs), each
        group once: the units a per-layer search prunes."""
        blocked = self.blocked_roots()
        owner = np.zeros(len(self.parent), dtype=int)
        for i, s in enumerate(self.sources):
            owner[s.offset: s.offset + s.channels] = i
        parent = list(range(len(self.sources)))

        def find(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        usable = set()
        for root, atoms in self.classes().items():
            touched = sorted(set(owner[atoms].tolist()))
            if root in blocked or not all(self.sources[t].prunable for t in touched):
                continue
            usable.update(touched)
            for t in touched[1:]:
                parent[find(t)] = find(touched[0])
        groups: dict[int, list[str]] = {}
        for i in sorted(usable):
            groups.setdefault(find(i), []).append(self.sources[i].node)
        return list(groups.values())

    def blocked_roots(self) -> dict[int, str]:
        roots: dict[int, str] = {}
        for atom, reason in self.blocked.items():
            roots.setdefault(self.find(atom), reason)
        return roots


def analyze(graph: Graph) -> ChannelGraph:
    """Trace channel atoms through ``graph``."""
    graph.infer_shapes()
    cg = ChannelGraph()
    for name in graph.input_names:
        shape = graph.shape(name)
        if shape and len(shape) >= 2 and isinstance(shape[1], int):
            atoms = cg.new_source(name, "input", shape[1], prunable=False)
            cg.atoms[name] = atoms
            cg.block(atoms, f"channels of graph input {name}")
    for node in graph.topological_order():
        _visit(graph, cg, node)
    for name in graph.output_names:
        cg.block(cg.atoms.get(name), f"channels reach graph output {name}")
    return cg


def _visit(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> None:
    op = node.op_type
    variable = [t for t in node.input if t and not graph.is_constant(t)]
    if any(t in cg.last_axis for t in variable) and op not in ELEMENTWISE and op not in ("Gemm", "MatMul"):
        _block_node(graph, cg, node, f"{op} {node.name} does not keep a sequence's features apart")
        return
    handler = _HANDLERS.get(op)
    if handler is not None and node.domain in ("", "ai.onnx") and handler(graph, cg, node):
        return
    if op in CHANNEL_WISE and node.domain in ("", "ai.onnx") and _channel_wise(graph, cg, node, variable):
        return
    _block_node(graph, cg, node, f"{op} {node.name} does not keep channels apart")


def _block_node(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto, reason: str) -> None:
    """Channels entering an op we cannot follow are frozen; its outputs start fresh, frozen too."""
    for t in node.input:
        cg.block(cg.atoms.get(t), reason)
    # A layer keeps its op type (its channels are reported as left alone, with why); any other op
    # is only where atoms start again.
    weighted = node.op_type in ("Conv", "Gemm", "MatMul") and graph.is_constant(node.input[1])
    op_type = node.op_type if weighted else f"{node.op_type} (blocked)"
    for t in node.output:
        shape = graph.shape(t)
        if t and shape and len(shape) >= 2 and isinstance(shape[1], int):
            atoms = cg.new_source(node.name, op_type, shape[1], prunable=False)
            cg.atoms[t] = atoms
            cg.block(atoms, reason)


def channel_axis(graph: Graph, cg: ChannelGraph, tensor: str) -> int:
    """The axis of ``tensor`` its atoms lie on."""
    return graph.rank(tensor) - 1 if tensor in cg.last_axis else 1


def _channels(graph: Graph, tensor: str) -> int | None:
    shape = graph.shape(tensor)
    return shape[1] if shape and len(shape) >= 2 and isinstance(shape[1], int) else None


def _channel_wise(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto, variable: list[str]) -> bool:
    out = node.output[0]
    out_shape = graph.shape(out)
    if not variable or out_shape is None or len(out_shape) < 2:
        return False
    atoms = [cg.atoms.get(t) for t in variable]
    features = {t in cg.last_axis for t in variable}
    if len(features) > 1:
        return False
    axis = len(out_shape) - 1 if features == {True} else 1
    if any(a is None for a in atoms) or any(len(a) != out_shape[axis] for a in atoms) \
            or (features == {True} and any(graph.rank(t) != len(out_shape) for t in variable)):
        return False  # a variable input broadcasts along channels: not channel-wise
    if node.op_type == "Pad" and not _pad_keeps_channels(graph, node):
        return False
    rank = len(out_shape)
    pending = []
    for i, t in enumerate(node.input):
        if not t or not graph.is_constant(t) or node.op_type in ("Clip", "Pad", "Resize", "Upsample"):
            continue  # activations; scalar bounds, pads and scales hold nothing per channel
        value = graph.initializer(t)
        if node.op_type in ("BatchNormalization", "InstanceNormalization"):
            pending.append(Action("param", node.name, atoms[0], input_index=i, axis=0))
            continue
        along = axis - (rank - value.ndim)  # channel axis of a broadcast constant (Mul/Add/PRelu ...)
        if along < 0 or value.shape[along] == 1:
            continue
        if value.shape[along] != len(atoms[0]):
            return False
        pending.append(Action("param", node.name, atoms[0], input_index=i, axis=along))
    for other in atoms[1:]:
        cg.union(atoms[0], other)
    cg.actions.extend(pending)
    cg.atoms[out] = atoms[0]
    if features == {True}:
        cg.last_axis.add(out)
    for extra in node.output[1:]:
        if extra and cg.atoms.get(extra) is None and _channels(graph, extra) == len(atoms[0]):
            cg.atoms[extra] = atoms[0]
    return True


def _pad_keeps_channels(graph: Graph, node: onnx.NodeProto) -> bool:
    pads = graph.initializer(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if pads is None:
        return False
    rank = len(pads) // 2
    return rank >= 2 and pads[1] == 0 and pads[rank + 1] == 0


def _conv(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> bool:
    if not graph.is_constant(node.input[1]) or (len(node.input) > 2 and node.input[2]
                                                  and not graph.is_constant(node.input[2])):
        return False
    weight = graph.initializer(node.input[1])
    groups = graph.attr(node, "group", 1)
    x_atoms = cg.atoms.get(node.input[0])
    out_ch, cin = weight.shape[0], weight.shape[1] * groups
    if x_atoms is None or len(x_atoms) != cin:
        return False
    if groups == 1:
        cg.actions.append(Action("in", node.name, x_atoms, input_index=1, axis=1))
        atoms = cg.new_source(node.name, "Conv", out_ch)
        cg.actions.append(Action("out", node.name, atoms, input_index=1, axis=0))
    elif groups == cin == out_ch:
        atoms = x_atoms
        cg.actions.append(Action("depthwise", node.name, atoms))
    else:
        reason = f"grouped Conv {node.name} (group={groups}) needs equal removal per group"
        cg.block(x_atoms, reason)
        atoms = cg.new_source(node.name, "Conv", out_ch, prunable=False)
        cg.block(atoms, reason)
    cg.atoms[node.output[0]] = atoms
    return True


def _dense(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> bool:
    """Gemm, or MatMul with a constant 2-D right operand on a 2-D input or a sequence (its
    features: the last axis; what came in on another axis, the steps of a sequence model, is
    left behind, blocked)."""
    a_atoms = cg.atoms.get(node.input[0])
    rank = graph.rank(node.input[0])
    if not graph.is_constant(node.input[1]) or a_atoms is None or rank is None or rank < 2:
        return False
    weight = graph.initializer(node.input[1])
    if weight.ndim != 2 or (rank > 2 and node.op_type != "MatMul"):
        return False
    if rank > 2 and node.input[0] not in cg.last_axis:
        cg.block(a_atoms, f"MatMul {node.name} reads the steps of a sequence")
        atoms = cg.new_source(node.name, node.op_type, weight.shape[1])
        cg.actions.append(Action("out", node.name, atoms, input_index=1, axis=1))
        cg.atoms[node.output[0]] = atoms
        cg.last_axis.add(node.output[0])
        return True
    trans_b = node.op_type == "Gemm" and graph.attr(node, "transB", 0)
    if node.op_type == "Gemm" and graph.attr(node, "transA", 0):
        return False
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]):
        return False
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    if len(a_atoms) != weight.shape[in_axis]:
        return False
    cg.actions.append(Action("in", node.name, a_atoms, input_index=1, axis=in_axis))
    atoms = cg.new_source(node.name, node.op_type, weight.shape[out_axis])
    cg.actions.append(Action("out", node.name, atoms, input_index=1, axis=out_axis))
    cg.atoms[node.output[0]] = atoms
    if rank > 2:
        cg.last_axis.add(node.output[0])
    return True


def _flatten(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> bool:
    atoms = cg.atoms.get(node.input[0])
    shape = graph.shape(node.input[0])
    if atoms is None or graph.attr(node, "axis", 1) != 1 or not shape or not all(isinstance(d, int) for d in shape):
        return False
    block = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    cg.atoms[node.output[0]] = np.repeat(atoms, block)
    return True


def _concat(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> bool:
    rank = graph.rank(node.output[0])
    axis = graph.attr(node, "axis")
    if rank is None or axis is None:
        return False
    parts = [cg.atoms.get(t) for t in node.input]
    if any(p is None for p in parts):
        return False
    if axis % rank == 1:
        cg.atoms[node.output[0]] = np.concatenate(parts)
        return True
    for other in parts[1:]:
        if len(other) != len(parts[0]):
            return False
        cg.union(parts[0], other)
    cg.atoms[node.output[0]] = parts[0]
    return True


def _split(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> bool:
    atoms = cg.atoms.get(node.input[0])
    rank = graph.rank(node.input[0])
    if atoms is None or rank is None:
        return False
    if graph.attr(node, "axis", 0) % rank != 1:
        for t in node.output:
            cg.atoms[t] = atoms
        return True
    sizes = [(_channels(graph, t) or 0) for t in node.output]
    if sum(sizes) != len(atoms) or 0 in sizes:
        return False
    cg.actions.append(Action("split", node.name, atoms))
    for t, part in zip(node.output, np.split(atoms, np.cumsum(sizes)[:-1])):
        cg.atoms[t] = part
    return True


def _slice(graph: Graph, cg: ChannelGraph, node: onnx.NodeProto) -> bool:
    """Slices that leave the channel axis whole pass channels through; others block."""
    atoms = cg.atoms.get(node.input[0])
    rank = graph.rank(node.input[0])
    if atoms is None or rank is None or len(node.input) < 4 or not graph.is_constant(node.input[3]):
        return False
    axes = [a % rank for a in graph.initializer(node.input[3]).tolist()]
    if 1 in axes or any(not graph.is_constant(t) for t in node.input[1:] if t):
        return False
    cg.atoms[node.output[0]] = atoms
    return True


_HANDLERS = {"Conv": _conv, "Gemm": _dense, "MatMul": _dense, "Flatten": _flatten, "Concat": _concat,
             "Split": _split, "Slice": _slice}
