"""A group of channels that only linear ops touch, narrowed in a basis chosen for it, not by selection.

Where every tensor of a coupled group is made by Conv/Gemm layers and residual Adds and read by
group-1 Conv/Gemm/MatMul layers, with no activation in between (the linear bottleneck stream of
MobileNetV2-style networks: project convs, Adds, expand convs), any change of basis of the group's
channels is exact: the producers' weights become ``B^T W``, the Adds carry ``B^T x``, the readers'
weights ``W A``. Keeping ``k`` directions of a chosen basis loses less than keeping ``k`` of the
channels, which is the one basis selection can use. SliceGPT (Ashkboos et al. 2024) does this to a
transformer's residual stream with PCA of the stream; here what matters is what the readers compute,
so the directions kept are the principal ones of the stream as the readers' weights see it: the top
eigenvectors of ``sum_r G_r^1/2 C_r G_r^1/2``, ``C_r`` the channel covariance of the tensor reader
``r`` reads and ``G_r`` its weights' Gram matrix over output channels and kernel taps (directions no
reader looks at are dropped first, however wide); ``_basis`` says when another closed form replaces
it. ``B`` is orthonormal and each reader takes ``W B``, plus the mean of the dropped directions
through its weights in its bias (what pruning's bias compensation adds). The readers are refit afterwards (``reconstruct``), as after
selection: that refit is the regression of what was dropped on what was kept. Doing that regression
here instead (``W C_r B (B^T C_r B)^-1``) lost more on every MobileNetV2 stream (0.562 against 0.551
for 24 -> 16 below) and failed where the statistics are thin (MobileNetV3's 96-channel stream at 2x2
positions, 72 samples: 0.455 against 0.065).

Measured on MobileNetV2 (BN folded; 64 ImageNet calibration images: 48 to fit, 16 held out; 186
others scored, top-1 83.3 %), each group alone, readers refit, held-out output error (top-1) with
channels selected -> narrowed: the 24-channel stream to 16: 0.662 -> 0.551 (57.0 -> 74.7 %); 32 ->
16: 0.718 -> 0.498 (48.9 -> 64.0); 64 -> 48: 0.365 -> 0.210 (78.5 -> 83.3); 64 -> 32: 0.630 -> 0.405
(51.1 -> 74.2); 96 -> 64: 0.486 -> 0.313 (67.7 -> 78.5); 96 -> 48: 0.699 -> 0.481 (43.0 -> 72.0); 160
-> 112: 0.534 -> 0.397 (65.6 -> 77.4); 160 -> 80: 0.709 -> 0.553 (36.0 -> 61.3); the last block's 320
outputs (read by the 1280-channel conv) to 240: 0.338 -> 0.124 (80.6 -> 83.3), to 160: 0.534 -> 0.287
(72.6 -> 81.2). The reduced-rank regression basis (generalized eigenvectors of ``sum_r C_r G_r C_r``
and ``sum_r C_r``) read 3-14 % higher errors on the streams; plain PCA of the stream 0.621 / 0.644 /
0.221 / - / 0.338 / - / 0.412 / - / 0.170.

Readers are pointwise (1x1 convs without padding, Gemm, MatMul): there ``sum_r tr(G_r P C_r P)`` is
what the readers lose. A kxk reader weighs each tap alone, where neighbouring positions of real
data are correlated, and zero padding makes the dropped mean a map of its output: MNIST factorized
by ``hwc lowrank`` (36 images fit, 12 held out), its 3-channel ``kx1`` stream read by the ``1xk``
conv kept to 1: 0.642 narrowed against 0.567 selected (and a 6272-value map); the Tucker-2 input
factor read by the 5x5 core, 6 -> 4: 0.191 against 0.187; the core's outputs read by the 1x1 factor,
13 -> 8: 0.201 against 0.261. Such groups are left to selection.

Clips on the group's tensors whose bounds the calibration data (almost) never reaches, what exports
of models trained for int8 put on linear outputs (MobileNetV2 of the model zoo), are range clips:
they are dropped, and the measured error says what that costs. A Clip that cuts more is an
activation, and the group is not linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..model.graph import Graph
from ..passes.channel_groups import ChannelGraph
from ..passes.layers import along_axis, bias_value, layer_matrix, set_bias
from ..passes.prune_channels import apply_compensation, consumer_contribution
from .recalibrate import channel_moments

MAX_CLIPPED = 1e-4  # a Clip cutting more than this share of its inputs on calibration data is an activation
CLEARLY_BETTER = 0.5  # another basis replaces the readers' view where it loses them less than this share
LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass
class LinearGroup:
    """The tensors of one group of coupled channels and the nodes around them."""

    layers: list[str]                 # the layers that make the group's channels (its producers)
    channels: int
    tensors: list[str]
    readers: list[tuple[str, str]] = field(default_factory=list)   # (layer, the group tensor it reads)
    constants: list[tuple[str, int]] = field(default_factory=list)  # (Add, its constant input's index)
    clips: list[str] = field(default_factory=list)
    basis: np.ndarray | None = None   # once narrowed: B [channels, kept], the directions its layers emit


def linear_group(graph: Graph, cg: ChannelGraph, group: list[str]) -> LinearGroup | str:
    """The group as a ``LinearGroup`` where only linear ops touch its channels; else why not."""
    source = next(s for s in cg.sources if s.node == group[0])
    roots = {cg.find(a) for a in range(source.offset, source.offset + source.channels)}
    tensors = [t for t, atoms in cg.atoms.items()
               if len(atoms) and all(cg.find(int(a)) in roots for a in atoms)]
    if any(len(cg.atoms[t]) != source.channels for t in tensors):
        return "its channels are joined with others (a Concat)"
    if any(len(graph.shape(t) or ()) > 2 for t in tensors) and any(graph.node(n).op_type == "MatMul" for n in group):
        return "its channels are the last axis of a sequence (not handled)"
    result = LinearGroup(list(group), source.channels, tensors)
    inside = set(tensors)
    for tensor in tensors:
        producer = graph.producer(tensor)
        if producer is None:
            return f"{tensor} is a graph input"
        if producer.op_type in ("Conv", "Gemm"):
            if producer.name not in group or not _plain_layer(graph, producer):
                return f"{producer.name} makes its channels with more than a linear layer"
        elif producer.op_type == "Add":
            constant = [i for i, t in enumerate(producer.input) if t not in inside]
            if len(constant) > 1 or (constant and not graph.is_constant(producer.input[constant[0]])):
                return f"{producer.name} adds something else to its channels"
            result.constants += [(producer.name, i) for i in constant]
        elif producer.op_type == "Clip":
            result.clips.append(producer.name)
        elif producer.op_type != "MatMul" or producer.name not in group:
            return f"{producer.op_type} {producer.name} touches its channels"
        for reader in graph.consumers(tensor):
            if reader.op_type in ("Add", "Clip") and reader.output[0] in inside:
                continue
            if reader.op_type in LAYERS and reader.input[0] == tensor and _plain_layer(graph, reader) \
                    and tensor not in reader.input[1:]:
                taps = graph.initializer(reader.input[1]).shape[2:] if reader.op_type == "Conv" else ()
                if any(t > 1 for t in taps):
                    return f"{reader.name} reads its channels through a {'x'.join(map(str, taps))} kernel"
                if reader.op_type == "Conv" and any(graph.attr(reader, "pads", [])):
                    return f"{reader.name} reads its channels with zero padding"
                result.readers.append((reader.name, tensor))
                continue
            return f"{reader.op_type} {reader.name} reads its channels"
    if not result.readers:
        return "nothing reads its channels"
    return result


def _plain_layer(graph: Graph, node: onnx.NodeProto) -> bool:
    """A group-1 Conv or a Gemm/MatMul with constant weights (what a change of basis can enter)."""
    if not graph.is_constant(node.input[1]):
        return False
    if node.op_type == "Conv":
        return graph.attr(node, "group", 1) == 1
    if node.op_type == "Gemm":
        return not graph.attr(node, "transA", 0)
    return graph.initializer(node.input[1]).ndim == 2


def narrow_groups(model: onnx.ModelProto, groups: list[tuple[LinearGroup, int]],
                  feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, dict[str, str], list[LinearGroup]]:
    """``model`` with each group narrowed to its kept count of directions, a note per group (by its
    first layer), and the groups narrowed (each with its basis). Their readers are left for the
    caller to refit. Groups may chain (a low-rank factorization's ``1x1 -> 1x1``: the middle layer
    reads one group and makes the next): each rewrite starts from the weights the last one left."""
    graph = Graph(model)
    statistics = _statistics(model, graph, groups, feeds)
    notes, narrowed = {}, []
    for group, keep in groups:
        means, covariances, clipped = statistics[group.layers[0]]
        if clipped > MAX_CLIPPED:
            notes[group.layers[0]] = f"not narrowed: a Clip on it cuts {clipped:.2%} of the calibration values"
            continue
        basis, explained = _basis(graph, group, covariances, keep)
        _rewrite(graph, group, basis, means)
        group.basis = basis
        narrowed.append(group)
        notes[group.layers[0]] = (f"{group.channels} -> {keep} directions (readers' outputs explained on calibration "
                                  f"data: {explained:.1%})" + (f"; {len(group.clips)} range Clip(s) dropped"
                                                               if group.clips else ""))
    return graph.to_model(), notes, narrowed


def _statistics(model, graph: Graph, groups, feeds):
    """Per group: each tensor's channel mean, each tensor's channel covariance, the share of values
    its Clips cut; one pass over the feeds."""
    tensors = sorted({t for g, _ in groups for t in g.tensors})
    clips = {clip: (graph.node(clip).input[0], *_clip_bounds(graph, graph.node(clip)))
             for g, _ in groups for clip in g.clips}  # each reads a tensor of its group
    clipped = {clip: [0.0, 0.0] for clip in clips}

    def count_clipped(values):
        for clip, (tensor, low, high) in clips.items():
            x = values[tensor]
            clipped[clip][0] += float(np.count_nonzero((x < low) | (x > high)))
            clipped[clip][1] += x.size

    moments = channel_moments(model, tensors, feeds, covariance=True, each_run=count_clipped)
    return {g.layers[0]: ({t: moments[t][0] for t in g.tensors}, {t: moments[t][1] for t in g.tensors},
                          max([clipped[c][0] / max(clipped[c][1], 1) for c in g.clips], default=0.0))
            for g, _ in groups}


def _clip_bounds(graph: Graph, node: onnx.NodeProto) -> tuple[float, float]:
    def bound(index: int, attr: str, default: float) -> float:
        if len(node.input) > index and node.input[index]:
            return float(graph.initializer(node.input[index]))
        return float(graph.attr(node, attr, default))
    return bound(1, "min", -np.inf), bound(2, "max", np.inf)


def _basis(graph: Graph, group: LinearGroup, covariances: dict[str, np.ndarray], keep: int):
    """(B [channels, keep], orthonormal, and the share of the readers' output variance it keeps):
    the stream's principal directions as the readers' weights see it, unless another closed form
    (the stream's own, the span of the reduced-rank regression) loses the readers less than
    ``CLEARLY_BETTER`` as much, ``sum_r tr(G_r P C_r P)`` with ``P = I - B B^T`` on the calibration
    statistics. That sum ignores what follows the readers (their activations): on MobileNetV2's last
    stream it preferred the stream's own directions, 0.0098 against 0.0128, which left a held-out
    output error of 0.170 against 0.124; on a stream whose variation spans fewer directions than
    kept, only its own basis keeps it whole."""
    grams = [(_gram(graph, reader, group.channels), covariances[tensor]) for reader, tensor in group.readers]
    roots = [(_root(g), c) for g, c in grams]
    pooled = sum(c for _, c in grams)
    candidates = [_principal(sum(r @ c @ r for r, c in roots), keep),  # as the readers' weights see it
                  _principal(pooled, keep)]  # the stream's own widest directions
    # the span of the reduced-rank regression of the readers' outputs
    damped = pooled + 1e-9 * max(float(np.trace(pooled)), 1e-30) / len(pooled) * np.eye(len(pooled))
    inverse = np.linalg.inv(np.linalg.cholesky(damped))
    weighted = inverse @ sum(c @ g @ c for g, c in grams) @ inverse.T
    candidates.append(np.linalg.qr(inverse.T @ _principal(weighted, keep))[0])
    total = sum(float(np.trace(g @ c)) for g, c in grams)

    def lost(basis):
        rest = np.eye(group.channels) - basis @ basis.T
        return sum(float(np.trace(g @ rest @ c @ rest)) for g, c in grams)

    best = candidates[0]
    for other in candidates[1:]:
        if lost(other) < CLEARLY_BETTER * lost(best):
            best = other
    return best, 1.0 - lost(best) / max(total, 1e-30)


def _gram(graph: Graph, reader: str, channels: int) -> np.ndarray:
    """A reader's weights' Gram matrix over its input channels (output channels and taps summed)."""
    taps = layer_matrix(graph, graph.node(reader)).reshape(channels, -1)
    return taps @ taps.T


def _root(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T


def _principal(matrix: np.ndarray, keep: int) -> np.ndarray:
    """The top ``keep`` eigenvectors of a symmetric matrix."""
    values, vectors = np.linalg.eigh(matrix)
    return vectors[:, np.argsort(values)[::-1][:keep]]


def _rewrite(graph: Graph, group: LinearGroup, basis: np.ndarray, means: dict[str, np.ndarray]) -> None:
    """Producers emit ``B^T y``, Adds' constants are projected, range Clips go, readers take
    ``W B`` plus the mean of the dropped directions in their bias."""
    for name in group.layers:
        node = graph.node(name)
        weight = graph.initializer(node.input[1])
        axis = _channel_axis(graph, node, output=True)
        graph.set_constant_input(node, 1, along_axis(weight, basis, axis), "narrowed_W")
        if node.op_type != "MatMul":  # a MatMul's bias is an Add inside the group: projected below
            set_bias(graph, node, basis.T @ bias_value(graph, node, group.channels), weight.dtype)
    for add, index in group.constants:
        node = graph.node(add)
        value = graph.initializer(node.input[index])
        rank = len(graph.shape(node.output[0]))
        full = value.reshape((1,) * (rank - value.ndim) + value.shape)
        full = np.repeat(full, group.channels, axis=1) if full.shape[1] == 1 else full
        graph.set_constant_input(node, index, along_axis(full, basis, 1), "narrowed")
    for clip in group.clips:
        graph.bypass(graph.node(clip))
    dropped = np.eye(group.channels) - basis @ basis.T
    for name, tensor in group.readers:
        node = graph.node(name)
        # The dropped directions' mean, through the reader's original weights (pruning's bias
        # compensation; a constant, readers being pointwise without padding).
        spatial = tuple(graph.shape(tensor)[2:])
        mean = dropped @ means[tensor]
        missing = consumer_contribution(graph, node, {c: np.full(spatial, mean[c]) for c in range(group.channels)})
        weight = graph.initializer(node.input[1])
        graph.set_constant_input(node, 1, along_axis(weight, basis, _channel_axis(graph, node, output=False)),
                                 "narrowed_W")
        apply_compensation(graph, {name: missing})
    graph.forget_shapes(group.tensors)


def _channel_axis(graph: Graph, node: onnx.NodeProto, output: bool) -> int:
    """The weight axis of the layer's output (or input) channels."""
    if node.op_type == "Conv":
        return 0 if output else 1
    transposed = node.op_type == "Gemm" and graph.attr(node, "transB", 0)
    return (0 if transposed else 1) if output else (1 if transposed else 0)

