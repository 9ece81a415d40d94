"""Residual branches, found and removed whole: ``x + f(x)`` becomes ``x + c``.

Pruning an inverted-residual or basic block's inner channels all the way is removing the block:
what is left of ``f(x)`` is a constant. A post-training network loses more from that than from
thinning a block, but not much more for some blocks once the layers after it are refit
(MobileNetV2, top-1 on 186 ImageNet samples, the branch replaced by its mean on 48 others and the
next four 1x1 convs refit, the residual path's to the original sum: within 1 point for 5 of its 10
residual blocks; 2 to 59 points unrefit), and it saves every layer of the block, where thinning
leaves each at a fraction. The channel pruning pass takes it as a layer ratio of 1: the branch that
layer lies on goes.

A branch is the part of the graph between a residual Add's two inputs: every node the branch input
depends on, back to the skip input, none of them read from outside the branch (no other path in
or out) and at least one of them a layer with constant weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..model.graph import Graph

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Branch:
    """One residual branch: the Add that closes it, its two inputs and what lies on it."""

    add: str
    skip: str  # the tensor the branch starts from and the Add adds back
    tensor: str  # the branch's output, the Add's other input
    nodes: tuple[str, ...]  # every node on the branch, in topological order
    layers: tuple[str, ...]  # its Conv/Gemm/MatMul layers, in topological order


def residual_branches(graph: Graph) -> list[Branch]:
    """Every residual branch of the graph, in the order of the Adds that close them."""
    order = {n.name: i for i, n in enumerate(graph.topological_order())}
    branches = []
    for add in sorted(graph.nodes, key=lambda n: order[n.name]):
        if add.op_type != "Add" or len(add.input) != 2 or any(graph.is_constant(t) for t in add.input):
            continue
        if graph.shape(add.input[0]) != graph.shape(add.input[1]) or graph.shape(add.input[0]) is None:
            continue  # a broadcast Add is no residual
        for tensor, skip in (tuple(add.input), tuple(reversed(add.input))):
            nodes = _nodes_between(graph, skip, tensor, add)
            if nodes is None:
                continue
            ranked = sorted(nodes, key=order.__getitem__)
            layers = tuple(n for n in ranked if graph.node(n).op_type in LAYER_OPS
                           and graph.is_constant(graph.node(n).input[1]))
            if layers:
                branches.append(Branch(add.name, skip, tensor, tuple(ranked), layers))
            break
    return branches


def branch_of(branches: list[Branch], layer: str) -> Branch | None:
    """The innermost branch the layer lies on (None: on none)."""
    holding = [b for b in branches if layer in b.nodes]
    return min(holding, key=lambda b: len(b.nodes)) if holding else None


def leads_branches(layers: list[str], branches: list[Branch]) -> bool:
    """Whether every layer lies on a branch whose first layer is among them: the group of coupled
    layers whose ratio 1 means those branches, named once (a branch's later layers do not)."""
    held = [branch_of(branches, name) for name in layers]
    return all(b is not None and b.layers[0] in layers for b in held)


def remove_branches(graph: Graph, branches: list[Branch], constants: dict[str, np.ndarray] | None = None
                    ) -> dict[str, list[str]]:
    """Replace each branch (as ``residual_branches`` found it in this graph) by ``constants[add]``
    (broadcast to its output; zero where not given) and remove its nodes. Returns the layers removed
    per Add; a branch on a branch removed with it is not named."""
    gone: set[str] = set()
    removed = {}
    for branch in sorted(branches, key=lambda b: -len(b.nodes)):  # outer branches first
        if branch.add in gone:
            continue
        add = graph.node(branch.add)
        dtype = graph.dtype(branch.tensor) or np.dtype(np.float32)
        value = (constants or {}).get(branch.add)
        if value is None:
            shape = graph.shape(branch.tensor)
            value = np.zeros((1, *shape[1:]) if shape and all(isinstance(d, int) for d in shape) else (1,))
        graph.set_constant_input(add, list(add.input).index(branch.tensor), value.astype(dtype), "branch_mean")
        for node_name in branch.nodes:
            graph.remove_node(graph.node(node_name))
        gone.update(branch.nodes)
        removed[branch.add] = list(branch.layers)
    return removed


def _nodes_between(graph: Graph, skip: str, tensor: str, add: onnx.NodeProto) -> set[str] | None:
    """The nodes ``tensor`` depends on back to ``skip``, if they form a closed branch off it."""
    start = graph.producer(tensor)
    if start is None or tensor in graph.output_names:
        return None
    nodes, stack, reads_skip = {start.name}, [start], False
    while stack:
        node = stack.pop()
        for t in node.input:
            if not t or graph.is_constant(t):
                continue
            if t == skip:
                reads_skip = True
                continue
            producer = graph.producer(t)
            if producer is None:
                return None  # reaches a graph input: not a branch off the skip tensor
            if producer.name not in nodes:
                nodes.add(producer.name)
                stack.append(producer)
    if not reads_skip:
        return None
    for name in nodes:
        for t in graph.node(name).output:
            if t in graph.output_names:
                return None
            readers = graph.consumers(t)
            if any(r.name not in nodes and not (r is add and t == tensor) for r in readers):
                return None
    return nodes

