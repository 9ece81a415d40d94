"""Fold a space-to-depth rearrangement into the conv that reads it: YOLOv5's and YOLOX's Focus
(four strided Slices, every second row and column from offsets (0,0), (1,0), (0,1), (1,1),
concatenated along channels) or a ``SpaceToDepth`` op, followed by a conv.

Channel ``s*C + c`` of the rearranged tensor at (y, x) is input channel ``c`` at (b*y + dy_s,
b*x + dx_s), so a k x k conv over it (stride s, pads p) is a (b*k) x (b*k) conv over the input
itself with stride b*s and pads b*p: its weight at (b*i + dy, b*j + dx) is the original weight at
(i, j) for the block (dy, dx). Same multiply-adds (3x3 over 12 channels = 6x6 over 3), no
rearranged copy: the Focus kernel (a gather from four strided planes, transposed to NHWC) took 9 %
of the YOLO-style example's run, and the 6x6 conv over 3 channels ran as fast as the 3x3 over 12
(AMD Zen 5, 2 threads: 12->16, 32 and 64 channels at 160x160, 0.30/0.30, 0.49/0.49, 1.08/1.00 ms).
YOLOv5 made the same change in its own networks (a 6x6 stride-2 conv). Exact up to the order of
the sums.
"""

from __future__ import annotations

import numpy as np

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def space_to_depth_as_conv(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type not in ("Concat", "SpaceToDepth") or node.domain not in ("", "ai.onnx"):
            continue
        found = _focus(graph, node) if node.op_type == "Concat" else _space_to_depth(graph, node)
        if found is None:
            continue
        source, block, offsets = found
        conv = graph.sole_consumer(node.output[0])
        problem = _conv_problem(graph, conv, node.output[0], source, block)
        if problem:
            log.skipped.append(f"{node.name}: {problem}")
            continue
        _rewrite(graph, conv, source, block, offsets)
        _remove_unread(graph, node)
        kh, kw = graph.initializer(conv.input[1]).shape[2:]
        log.applied.append(f"{node.name} -> {conv.name}: space-to-depth by {block} folded into a "
                           f"{kh}x{kw} conv over {source}")


def _focus(graph: Graph, concat) -> tuple[str, int, list[tuple[int, int]]] | None:
    """(source, 2, per-input offsets) where every input of a channel Concat is the same NCHW tensor
    sliced by a chain of Slices to every second row and column from its own offset (dy, dx), the
    four offsets each once; else None."""
    if graph.attr(concat, "axis") not in (1, -3) or len(concat.input) != 4:
        return None
    sources, offsets = set(), []
    for tensor in concat.input:
        walked = _strided_quarter(graph, tensor)
        if walked is None:
            return None
        sources.add(walked[0])
        offsets.append(walked[1])
    if len(sources) != 1 or sorted(offsets) != [(0, 0), (0, 1), (1, 0), (1, 1)]:
        return None
    return sources.pop(), 2, offsets


def _strided_quarter(graph: Graph, tensor: str) -> tuple[str, tuple[int, int]] | None:
    """(the tensor sliced, (row offset, column offset)) where ``tensor`` is a 4-D tensor sliced by
    one or two Slices with step 2 along rows and columns, starting at 0 or 1 and running to the
    end; else None."""
    starts: dict[int, int] = {}
    node = graph.producer(tensor)
    while node is not None and node.op_type == "Slice" and node.domain in ("", "ai.onnx"):
        shape = graph.shape(node.input[0])
        values = [graph.initializer(t) if t else None for t in list(node.input[1:]) + [""] * (5 - len(node.input))]
        start, end, axes, steps = values[:4]
        if shape is None or len(shape) != 4 or any(v is None for v in (start, end, axes, steps)):
            return None
        for a, s, e, st in zip(axes.tolist(), start.tolist(), end.tolist(), steps.tolist()):
            a = a % 4
            if a not in (2, 3) or a in starts or st != 2 or s not in (0, 1) or not isinstance(shape[a], int) \
                    or shape[a] % 2 or e < shape[a]:
                return None
            starts[a] = s
        tensor, node = node.input[0], graph.producer(node.input[0])
        if len(starts) == 2:
            return tensor, (starts[2], starts[3])
    return None


def _space_to_depth(graph: Graph, node) -> tuple[str, int, list[tuple[int, int]]] | None:
    """SpaceToDepth's output block ``by*b + bx`` holds offset (by, bx)."""
    block = graph.attr(node, "blocksize")
    shape = graph.shape(node.input[0])
    if not block or shape is None or len(shape) != 4 or not all(isinstance(d, int) and d % block == 0
                                                                   for d in shape[2:]):
        return None
    return node.input[0], block, [(by, bx) for by in range(block) for bx in range(block)]


def _conv_problem(graph: Graph, conv, tensor: str, source: str, block: int) -> str | None:
    """Why the conv reading the rearranged tensor cannot take the input itself (None: it can)."""
    if conv is None or conv.op_type != "Conv" or conv.input[0] != tensor or tensor in graph.output_names:
        return "read by something other than one conv"
    weight = graph.initializer(conv.input[1])
    attrs = graph.attrs(conv)
    if weight is None or weight.ndim != 4 or (len(conv.input) > 2 and conv.input[2] and not graph.is_constant(conv.input[2])):
        return "the conv's weights are not constant"
    if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        return "the conv is grouped or dilated"
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "the conv's padding is not explicit"
    shape = graph.shape(source)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return "the input's shape is not static"
    if weight.shape[1] != block * block * shape[1]:
        return "the conv does not read the rearranged channels as they are"
    return None


def _rewrite(graph: Graph, conv, source: str, block: int, offsets: list[tuple[int, int]]) -> None:
    weight = graph.initializer(conv.input[1])
    out_channels, channels, kh, kw = weight.shape
    part = channels // len(offsets)
    folded = np.zeros((out_channels, part, block * kh, block * kw), weight.dtype)
    for index, (dy, dx) in enumerate(offsets):
        folded[:, :, dy::block, dx::block] = weight[:, index * part:(index + 1) * part]
    attrs = graph.attrs(conv)
    graph.set_constant_input(conv, 1, folded, "Wspace")
    graph.set_input(conv, 0, source)
    graph.set_attr(conv, "kernel_shape", [block * kh, block * kw])
    graph.set_attr(conv, "strides", [block * s for s in attrs.get("strides", [1, 1])])
    graph.set_attr(conv, "pads", [block * p for p in attrs.get("pads", [0, 0, 0, 0])])


def _remove_unread(graph: Graph, node) -> None:
    """The rearranging node and the Slices feeding it, where nothing else reads them."""
    pending = [node]
    while pending:
        current = pending.pop()
        if any(graph.consumers(t) or t in graph.output_names for t in current.output):
            continue
        graph.remove_node(current)
        pending.extend(p for t in current.input if t and (p := graph.producer(t)) is not None and p.op_type == "Slice")
