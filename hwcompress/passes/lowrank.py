"""Low-rank factorization: replace large linear layers by products of smaller ones.

- Gemm / MatMul / 1x1 Conv (a matrix ``W [in, out]``): truncated SVD, ``x W ~ (x A) B`` with rank r.
- kxk Conv, *spatial SVD* (as in AIMET): ``W[o, c, i, j] ~ sum_r V[r, c, i] H[o, r, j]``, i.e. a
  kx1 Conv with r outputs followed by a 1xk Conv; stride, padding and dilation split by axis.
- kxk Conv, *Tucker-2* (channel SVD on both channel modes, HOSVD): 1x1 (C -> r1), kxk (r1 -> r2),
  1x1 (r2 -> O).

Ranks come from the retained energy of the singular values (or an explicit rank / fraction), are
rounded up to the target's rank multiple, and a layer is only factorized where it saves at least
``min_saving`` of its multiply-accumulates. With calibration statistics (``LayerStatistics``) the
factors are chosen to minimize the layer's *output* error instead of the weight error (SVD of
``C^(1/2) W`` with C the input covariance, as in SVD-LLM / data-aware low-rank methods): for a
matrix, the covariance of its input vectors; for spatial SVD, that of the kh-tall input columns the
kx1 factor reads (neighbouring rows of an image are correlated, so the column's own covariance, not
the channels' repeated); for Tucker-2, the channel covariance on the input mode and the principal
directions of the layer's output on the output mode. The ranks still come from the weights' own
spectra, so plain and data-aware factors are compared at equal cost.
Depthwise and grouped Convs are skipped, with the reason. At full rank every rewrite is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..errors import HwcError
from ..model.graph import Graph
from .base import PassLog, model_pass
from ..model.numeric import conv_pads
from .layers import bias_value, layer_matrix

METHODS = ("svd", "spatial", "tucker2")


@dataclass(frozen=True)
class LayerStatistics:
    """Second moments of one layer's data on calibration runs, for data-aware factors."""

    inputs: np.ndarray | None = None  # E[x x^T] of its input vectors (a conv's: channels at a position)
    columns: np.ndarray | None = None  # a kxk conv: E[v v^T] of the kh-tall input columns, (channel, row) order
    outputs: np.ndarray | None = None  # a kxk conv: E[y y^T] of its output channels, bias left out


@dataclass
class Factorization:
    method: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    weight_error: float
    full_ranks: tuple[int, ...] = ()
    build: Any = None  # callable(graph, node) that rewrites the node

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "build"}


def choose_rank(singular: np.ndarray, energy: float | None, rank: int | float | None, multiple: int) -> int:
    """Smallest rank keeping ``energy`` of sum(s^2), or the explicit rank (int) / fraction (float <= 1),
    rounded up to ``multiple`` and capped at full rank."""
    full = len(singular)
    if rank is not None:
        r = int(math.ceil(rank * full)) if isinstance(rank, float) and rank <= 1 else int(rank)
    else:
        cumulative = np.cumsum(singular.astype(np.float64) ** 2)
        r = int(np.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12)) + 1)
    r = int(math.ceil(max(1, r) / multiple) * multiple)
    return min(r, full)


@model_pass
def lowrank(graph: Graph, log: PassLog, energy: float = 0.95, rank: int | float | None = None,
            methods: tuple[str, ...] = METHODS, multiple: int = 1, min_saving: float | None = 0.2,
            statistics: dict[str, LayerStatistics] | None = None, layers: tuple[str, ...] | None = None) -> None:
    """Factorize every Gemm/MatMul/Conv (or only ``layers``) where a method saves at least
    ``min_saving`` of its MACs.

    ``min_saving=None`` factorizes regardless (used to check exactness at full rank).
    ``statistics`` maps a layer name to its calibration statistics (``compress.lowrank.
    layer_statistics``) for the data-aware factors.
    """
    if not 0.0 < energy <= 1.0:
        raise HwcError(f"energy {energy} must be in (0, 1]")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise HwcError(f"unknown low-rank method(s) {sorted(unknown)}; use {', '.join(METHODS)}")
    graph.infer_shapes()
    table = {}
    for node in list(graph.topological_order()):
        reason = _unsupported(graph, node)
        if reason == "" or (layers is not None and node.name not in layers):
            continue
        if reason:
            log.skipped.append(f"{node.name}: {reason}")
            continue
        data = (statistics or {}).get(node.name, LayerStatistics())
        options = [f for f in _candidates(graph, node, energy, rank, methods, multiple, data) if f]
        if not options:
            log.skipped.append(f"{node.name}: no requested method applies")
            continue
        best = min(options, key=lambda f: f.macs_after)
        saving = 1 - best.macs_after / best.macs_before
        if min_saving is not None and saving < min_saving:
            log.skipped.append(f"{node.name}: best factorization ({best.method}, rank {best.ranks}) saves only "
                               f"{saving:.0%} of its MACs")
            continue
        best.build(graph, node)
        table[node.name] = best.to_dict()
        log.applied.append(f"{node.name}: {best.method} rank {'x'.join(map(str, best.ranks))}, MACs "
                           f"{best.macs_before:,} -> {best.macs_after:,}, weight error {best.weight_error:.3g}")
    log.details["layers"] = table


def _unsupported(graph: Graph, node: onnx.NodeProto) -> str | None:
    """'' for nodes that are not linear layers, a reason for layers we skip, None if supported."""
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return ""
    if not graph.is_constant(node.input[1]):
        return "weights are not constant"
    weight = graph.initializer(node.input[1])
    if node.op_type == "Conv":
        if graph.attr(node, "group", 1) != 1:
            return "depthwise or grouped Conv: already factorized along channels"
        if weight.ndim != 4:
            return "only 2-D convolutions are factorized"
        if len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]):
            return "bias is not constant"
    if node.op_type == "Gemm" and (graph.attr(node, "transA", 0) or (
            len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]))):
        return "transposed input or non-constant bias"
    if node.op_type == "MatMul" and weight.ndim != 2:
        return "batched MatMul"
    return None


def _out_positions(graph: Graph, node: onnx.NodeProto) -> int:
    shape = graph.shape(node.output[0])
    return int(np.prod(shape[2:])) * shape[0] if node.op_type == "Conv" else int(np.prod(shape[:-1]))


def _candidates(graph, node, energy, rank, methods, multiple, data: LayerStatistics):
    weight = graph.initializer(node.input[1])
    is_1x1 = node.op_type != "Conv" or weight.shape[2:] == (1, 1)
    if is_1x1:
        if "svd" in methods:
            yield _svd(graph, node, energy, rank, multiple, data.inputs)
        return
    if "spatial" in methods and weight.shape[2] > 1 and weight.shape[3] > 1:
        yield _spatial(graph, node, energy, rank, multiple, data.columns)
    if "tucker2" in methods:
        yield _tucker2(graph, node, energy, rank, multiple, data.inputs, data.outputs)


def _whitening(covariance: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``S = C^(1/2)`` and its inverse (identity without data, or with data of another size);
    tiny eigenvalues are floored."""
    if covariance is None or len(covariance) != size:
        return np.eye(size), np.eye(size)
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, values.max() * 1e-8 + 1e-12)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def _svd(graph, node, energy, rank, multiple, covariance) -> Factorization:
    m = layer_matrix(graph, node)
    n_in, n_out = m.shape
    # The rank comes from the weights' own spectrum, so plain and data-aware factors are compared
    # at equal cost; the data only changes which rank-r subspace is kept.
    r = choose_rank(np.linalg.svd(m, compute_uv=False), energy, rank, multiple)
    s_half, s_inv = _whitening(covariance, n_in)
    u, sing, vt = np.linalg.svd(s_half @ m, full_matrices=False)
    a = s_inv @ u[:, :r] * np.sqrt(sing[:r])          # [in, r]
    b = np.sqrt(sing[:r])[:, None] * vt[:r]           # [r, out]
    positions = _out_positions(graph, node)
    error = float(np.linalg.norm(m - a @ b) / max(np.linalg.norm(m), 1e-30))

    def build(g: Graph, n: onnx.NodeProto) -> None:
        dtype = g.initializer(n.input[1]).dtype
        bias = bias_value(g, n, n_out) if n.op_type != "MatMul" else None
        mid = g.unique_name(f"{n.name}_lowrank")
        if n.op_type == "Conv":
            first = g.make_node("Conv", [n.input[0], g.add_initializer(f"{n.name}_U", a.T.reshape(r, n_in, 1, 1).astype(dtype))],
                                [mid], name=f"{n.name}_U", kernel_shape=[1, 1], **_conv_attrs(g, n))
            inputs = [mid, g.add_initializer(f"{n.name}_V", b.T.reshape(n_out, r, 1, 1).astype(dtype)),
                      g.add_initializer(f"{n.name}_bias", bias.astype(dtype))]
            second = g.make_node("Conv", inputs, [n.output[0]], name=f"{n.name}_V", kernel_shape=[1, 1])
        else:
            first = g.make_node("MatMul", [n.input[0], g.add_initializer(f"{n.name}_U", a.astype(dtype))], [mid],
                                name=f"{n.name}_U")
            if n.op_type == "Gemm":
                second = g.make_node("Gemm", [mid, g.add_initializer(f"{n.name}_V", b.astype(dtype)),
                                              g.add_initializer(f"{n.name}_bias", bias.astype(dtype))],
                                     [n.output[0]], name=f"{n.name}_V")
            else:
                second = g.make_node("MatMul", [mid, g.add_initializer(f"{n.name}_V", b.astype(dtype))],
                                     [n.output[0]], name=f"{n.name}_V")
        g.replace_node(n, [first, second])

    return Factorization("svd", (r,), positions * n_in * n_out, positions * r * (n_in + n_out),
                         n_in * n_out, r * (n_in + n_out), error, (min(n_in, n_out),), build)


def _conv_attrs(graph: Graph, node: onnx.NodeProto) -> dict[str, Any]:
    """Stride and padding of a 1x1 Conv, kept on the first factor (it sees the input grid)."""
    attrs = graph.attrs(node)
    return {k: attrs[k] for k in ("strides", "pads", "auto_pad") if k in attrs}


def _spatial(graph, node, energy, rank, multiple, columns: np.ndarray | None = None) -> Factorization:
    """``columns``: covariance of the kh-tall input columns the kx1 factor reads, (channel, row) order."""
    weight = graph.initializer(node.input[1]).astype(np.float64)
    out_ch, in_ch, kh, kw = weight.shape
    # M[(c, i), (o, j)] = W[o, c, i, j]: the 1xk factor sums kw columns, each read through M.
    m = weight.transpose(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)
    r = choose_rank(np.linalg.svd(m, compute_uv=False), energy, rank, multiple)
    s_half, s_inv = _whitening(columns, in_ch * kh)
    u, sing, vt = np.linalg.svd(s_half @ m, full_matrices=False)
    vertical = (s_inv @ u[:, :r] * np.sqrt(sing[:r])).T.reshape(r, in_ch, kh, 1)
    horizontal = (np.sqrt(sing[:r])[:, None] * vt[:r]).reshape(r, out_ch, kw).transpose(1, 0, 2)[:, :, None, :]
    approx = np.einsum("rci,orj->ocij", vertical[..., 0], horizontal[:, :, 0, :])
    error = float(np.linalg.norm(weight - approx) / max(np.linalg.norm(weight), 1e-30))
    out_shape, in_shape = graph.shape(node.output[0]), graph.shape(node.input[0])
    mid_positions = in_shape[0] * out_shape[2] * in_shape[3]  # after the kx1 conv: Ho x W_in
    out_positions = out_shape[0] * out_shape[2] * out_shape[3]

    def build(g: Graph, n: onnx.NodeProto) -> None:
        attrs = g.attrs(n)
        strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
        top, left, bottom, right = conv_pads(attrs, in_shape[2:], (kh, kw), strides, dilations)
        dtype = g.initializer(n.input[1]).dtype
        bias = bias_value(g, n, out_ch)
        mid = g.unique_name(f"{n.name}_kx1")
        first = g.make_node("Conv", [n.input[0], g.add_initializer(f"{n.name}_kx1", vertical.astype(dtype))], [mid],
                            name=f"{n.name}_kx1", kernel_shape=[kh, 1], strides=[strides[0], 1],
                            dilations=[dilations[0], 1], pads=[top, 0, bottom, 0])
        second = g.make_node("Conv", [mid, g.add_initializer(f"{n.name}_1xk", horizontal.astype(dtype)),
                                      g.add_initializer(f"{n.name}_bias", bias.astype(dtype))], [n.output[0]],
                             name=f"{n.name}_1xk", kernel_shape=[1, kw], strides=[1, strides[1]],
                             dilations=[1, dilations[1]], pads=[0, left, 0, right])
        g.replace_node(n, [first, second])

    return Factorization("spatial", (r,), out_positions * in_ch * kh * kw * out_ch,
                         mid_positions * in_ch * kh * r + out_positions * r * kw * out_ch,
                         weight.size, r * (in_ch * kh + out_ch * kw), error, (len(sing),), build)


def _tucker2(graph, node, energy, rank, multiple, inputs: np.ndarray | None = None,
             outputs: np.ndarray | None = None) -> Factorization:
    """The first 1x1 factor projects the input channels (``P``, r1 x C) and the core reads them
    back through ``D`` (C x r1): with the input channel covariance ``C = S^2``, ``D P`` keeps the
    r1 whitened directions the weights see most (the matrix case's SVD of ``S W``, each tap alike).
    The last factor spans the output's principal directions where ``outputs`` is given."""
    weight = graph.initializer(node.input[1]).astype(np.float64)
    out_ch, in_ch, kh, kw = weight.shape
    u_out, s_out, _ = np.linalg.svd(weight.reshape(out_ch, -1), full_matrices=False)
    unfold_in = weight.transpose(1, 0, 2, 3).reshape(in_ch, -1)
    s_in = np.linalg.svd(unfold_in, compute_uv=False)
    r1 = choose_rank(s_in, energy, rank, multiple)
    r2 = choose_rank(s_out, energy, rank, multiple)
    s_half, s_inv = _whitening(inputs, in_ch)
    u_in = np.linalg.svd(s_half @ unfold_in, full_matrices=False)[0][:, :r1]
    project, back = u_in.T @ s_inv, s_half @ u_in  # P [r1, C], D [C, r1]
    if outputs is not None and len(outputs) == out_ch:
        u_out = np.linalg.eigh(outputs)[1][:, ::-1]
    u_out = u_out[:, :r2]
    core = np.einsum("ocij,or,cs->rsij", weight, u_out, back, optimize=True)  # [r2, r1, kh, kw]
    approx = np.einsum("rsij,or,sc->ocij", core, u_out, project, optimize=True)
    error = float(np.linalg.norm(weight - approx) / max(np.linalg.norm(weight), 1e-30))
    in_shape, out_shape = graph.shape(node.input[0]), graph.shape(node.output[0])
    in_positions = in_shape[0] * in_shape[2] * in_shape[3]
    out_positions = out_shape[0] * out_shape[2] * out_shape[3]

    def build(g: Graph, n: onnx.NodeProto) -> None:
        attrs = g.attrs(n)
        dtype = g.initializer(n.input[1]).dtype
        bias = bias_value(g, n, out_ch)
        a, b = g.unique_name(f"{n.name}_in"), g.unique_name(f"{n.name}_core")
        first = g.make_node("Conv", [n.input[0], g.add_initializer(f"{n.name}_in", project[:, :, None, None].astype(dtype))],
                            [a], name=f"{n.name}_in", kernel_shape=[1, 1])
        core_attrs = {k: attrs[k] for k in ("strides", "pads", "dilations", "auto_pad") if k in attrs}
        middle = g.make_node("Conv", [a, g.add_initializer(f"{n.name}_core", core.astype(dtype))], [b],
                             name=f"{n.name}_core", kernel_shape=[kh, kw], **core_attrs)
        last = g.make_node("Conv", [b, g.add_initializer(f"{n.name}_out", u_out[:, :, None, None].astype(dtype)),
                                    g.add_initializer(f"{n.name}_bias", bias.astype(dtype))], [n.output[0]],
                           name=f"{n.name}_out", kernel_shape=[1, 1])
        g.replace_node(n, [first, middle, last])

    macs_after = in_positions * in_ch * r1 + out_positions * (r1 * r2 * kh * kw + r2 * out_ch)
    return Factorization("tucker2", (r1, r2), out_positions * in_ch * kh * kw * out_ch, macs_after,
                         weight.size, in_ch * r1 + r1 * r2 * kh * kw + r2 * out_ch, error,
                         (len(s_in), len(s_out)), build)


def factorizable_layers(model: onnx.ModelProto) -> list[str]:
    """The layers this pass can factorize: Gemm, 2-D MatMul and 2-D Conv (group 1), constant weights."""
    graph = Graph(model)
    return [n.name for n in graph.nodes if _unsupported(graph, n) is None]
