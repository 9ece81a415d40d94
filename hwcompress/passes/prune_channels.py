"""Structured channel pruning: remove whole output channels and rewrite every coupled tensor.

1. ``channel_groups.analyze`` finds which channels must go together (residual Adds, Concat offsets,
   depthwise convs, Flatten into Gemm, ...), and which may not be touched at all.
2. Each removable class of channels gets an importance: the L1 or L2 norm of the filters that
   produce it, or |BN gamma| where a BatchNormalization follows, summed over the class; or, with
   ``importance="reconstruction"``, scores per input channel of the layers that read it, computed
   from calibration data by the caller (``compress.channel_importance``: what the readers lose).
3. Per layer, the least important classes are removed until the layer keeps ``(1 - ratio)`` of its
   channels rounded down to the target's channel multiple (at least one multiple). A group whose
   layers cannot all land on a multiple is left whole, and reported.
4. Bias compensation: a removed channel still emits its bias through the layers that follow it; that
   constant contribution is computed in numpy and folded into the next layer's bias (or added as a
   constant map where zero padding makes it position dependent). Removing channels whose filters
   are zero is therefore exact.

A layer ratio of 1 removes every channel: the residual branch the layer lies on goes whole
(``residual_branches``: ``x + f(x)`` becomes ``x + c``), before the other layers are pruned.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import HwcError
from ..model.graph import Graph
from ..model.numeric import conv2d, conv_pads, pool2d
from .base import PassLog, model_pass
from .layers import bias_value, layer_matrix, set_bias
from .channel_groups import ChannelGraph, analyze, channel_axis
from .residual_branches import branch_of, remove_branches, residual_branches

IMPORTANCES = ("l1", "l2", "bn_gamma", "reconstruction")


@dataclass
class PruningPlan:
    """Which atoms go, and what each layer becomes."""

    removed: set[int] = field(default_factory=set)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_alone: list[str] = field(default_factory=list)


def kept_channels(channels: int, ratio: float, multiple: int) -> int:
    """Channels a layer keeps: ``channels * (1 - ratio)`` rounded down to ``multiple``, at least one."""
    if channels <= multiple:
        return channels
    keep = int(np.floor(channels * (1.0 - ratio) / multiple)) * multiple
    return min(channels, max(multiple, keep))


@model_pass
def prune_channels(graph: Graph, log: PassLog, ratio: float = 0.3, multiple: int = 1,
                   layer_ratios: dict[str, float] | None = None, importance: str = "l1",
                   removed_atoms: dict[str, list[int]] | None = None,
                   input_scores: dict[str, np.ndarray] | None = None,
                   branch_constants: dict[str, np.ndarray] | None = None) -> None:
    """Remove about ``ratio`` of the output channels of every prunable Conv/Gemm/MatMul.

    ``layer_ratios`` overrides the ratio per layer (node name); 1 removes the residual branch the
    layer lies on, its output replaced by ``branch_constants[add]`` (zero where not given).
    ``removed_atoms`` names exactly which output channels of which layers to remove (used to test
    exactness); it bypasses the importance ranking but not the dependency rules. ``input_scores``
    (importance "reconstruction"): per reading layer, a score per input channel, higher = keep.
    """
    # ratio 0 with layer_ratios: only the named layers lose channels (a per-layer search step).
    if not 0.0 <= ratio < 1.0 or (ratio == 0 and not layer_ratios and removed_atoms is None):
        raise HwcError(f"pruning ratio {ratio} must be between 0 and 1 (exclusive)")
    for r in (layer_ratios or {}).values():
        if not 0.0 < r <= 1.0:
            raise HwcError(f"layer pruning ratio {r} must be above 0 and at most 1 (1: the layer's residual "
                           "branch removed)")
    if multiple < 1:
        raise HwcError(f"channel multiple {multiple} must be at least 1")
    layers = {n.name for n in graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")}
    unknown = sorted(set(layer_ratios or {}) - layers)
    if unknown:
        raise HwcError(f"no Conv/Gemm/MatMul layer named {unknown[0]!r} in the model"
                       + (f" ({len(unknown)} unknown names)" if len(unknown) > 1 else "")
                       + f"; its layers are e.g. {', '.join(sorted(layers)[:5])}")
    layer_ratios = dict(layer_ratios or {})
    removed_layers = _remove_branches(graph, log, layer_ratios, branch_constants)
    for name in removed_layers:
        layer_ratios.pop(name, None)
    if removed_layers and not ratio and not layer_ratios:
        log.details.update(kept_outputs={}, consumers=[], layers=removed_layers)
        return
    cg = analyze(graph)
    if removed_atoms is not None:
        plan = _explicit_plan(cg, removed_atoms)
    else:
        scores = _atom_importance(graph, cg, importance, input_scores)
        plan = _plan(cg, scores, ratio, layer_ratios or {}, multiple)
    if not plan.removed and removed_layers:
        log.skipped.extend(plan.left_alone)
        log.details.update(kept_outputs={}, consumers=[], layers=removed_layers)
        return
    if not plan.removed:
        reasons = "; ".join(sorted(set(plan.left_alone))[:4]) or "no Conv/Gemm/MatMul output channels"
        raise HwcError(f"nothing prunable at ratio {ratio} with channel multiple {multiple}: {reasons}")
    keep = np.ones(len(cg.parent), dtype=bool)
    keep[list(plan.removed)] = False
    compensation = _compensation(graph, cg, plan.removed)
    log.details["kept_outputs"] = {a.node: np.flatnonzero(keep[a.atoms]).tolist()
                                   for a in cg.actions if a.kind == "out" and not keep[a.atoms].all()}
    log.details["consumers"] = _rewrite(graph, cg, keep)
    for action in cg.actions:  # the consumer may lose output channels too: drop their share
        if action.kind == "out" and action.node in compensation:
            compensation[action.node] = compensation[action.node][keep[action.atoms]]
    notes = apply_compensation(graph, compensation)
    log.applied.extend(f"{name}: {info['before']} -> {info['after']} channels"
                       for name, info in plan.layers.items() if info["after"] != info["before"])
    log.applied.extend(notes)
    log.skipped.extend(plan.left_alone)
    log.details["layers"] = removed_layers | plan.layers


def _remove_branches(graph: Graph, log: PassLog, layer_ratios: dict[str, float],
                     constants: dict[str, np.ndarray] | None) -> dict[str, dict[str, Any]]:
    """Remove the residual branches of the layers at ratio 1; their layers as the plan describes
    layers (``after`` 0)."""
    whole = [name for name, r in layer_ratios.items() if r == 1.0]
    if not whole:
        return {}
    branches = residual_branches(graph)
    chosen = []
    for name in whole:
        branch = branch_of(branches, name)
        if branch is None:
            raise HwcError(f"{name} lies on no residual branch: a ratio of 1 removes the residual branch a layer "
                           "lies on (x + f(x) -> x + c)")
        if branch not in chosen:
            chosen.append(branch)
    layers = {}
    for branch in chosen:
        for name in branch.layers:
            node = graph.node(name)
            layers[name] = {"op": node.op_type, "before": int(layer_matrix(graph, node).shape[1]), "after": 0}
    removed = remove_branches(graph, chosen, constants)
    log.applied.extend(f"{add}: residual branch removed ({len(names)} layers: {', '.join(names)}), its output "
                       f"replaced by {'its mean' if constants and add in constants else 'zero'}"
                       for add, names in removed.items())
    log.details["removed_branches"] = removed
    return layers


# ------------------------------------------------------------------ importance
def _atom_importance(graph: Graph, cg: ChannelGraph, mode: str,
                     input_scores: dict[str, np.ndarray] | None = None) -> np.ndarray:
    if mode not in IMPORTANCES:
        raise HwcError(f"unknown importance {mode!r}; use {', '.join(IMPORTANCES)}")
    if mode == "reconstruction":
        if input_scores is None:
            raise HwcError("importance 'reconstruction' needs calibration data to score channels")
        return _reader_importance(graph, cg, input_scores)
    scores = np.zeros(len(cg.parent))
    for action in cg.actions:
        if action.kind != "out":
            continue
        node = graph.node(action.node)
        weight = graph.initializer(node.input[action.input_index]).astype(np.float64)
        moved = np.moveaxis(weight, action.axis, 0).reshape(weight.shape[action.axis], -1)
        norm = np.abs(moved).sum(1) if mode != "l2" else np.sqrt((moved ** 2).sum(1))
        if mode == "bn_gamma":
            gamma = _following_bn_gamma(graph, node)
            norm = np.abs(gamma) if gamma is not None and len(gamma) == len(norm) else norm
        # Layers of one residual group live on different scales: rank within each layer.
        scores[action.atoms] = norm / max(float(norm.mean()), 1e-12)
    return scores


def _reader_importance(graph: Graph, cg: ChannelGraph, input_scores: dict[str, np.ndarray]) -> np.ndarray:
    """Atom scores summed over the layers that read them; classes no scored layer reads come
    after every scored one, ranked among themselves by filter L1 norm."""
    scores = np.zeros(len(cg.parent))
    scored = np.zeros(len(cg.parent), dtype=bool)
    for action in cg.actions:
        if action.kind == "in" and action.node in input_scores:
            atoms = action.channels()
            np.add.at(scores, atoms, input_scores[action.node])
            scored[atoms] = True
    classes = cg.classes()
    unscored = [a for atoms in classes.values() if not scored[atoms].any() for a in atoms]
    if unscored:
        fallback = _atom_importance(graph, cg, "l1")
        scores[unscored] = scores.max(initial=0.0) + 1.0 + fallback[unscored]
    return scores


def _following_bn_gamma(graph: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    user = graph.sole_consumer(node.output[0])
    if user is not None and user.op_type == "BatchNormalization":
        return graph.initializer(user.input[1])
    return None


# -------------------------------------------------------------------- planning
def _plan(cg: ChannelGraph, scores: np.ndarray, ratio: float, layer_ratios: dict[str, float],
          multiple: int) -> PruningPlan:
    plan = PruningPlan()
    blocked = cg.blocked_roots()
    classes = cg.classes()
    quota: dict[int, int] = {}
    for i, s in enumerate(cg.sources):
        if not s.prunable or (ratio == 0 and s.node not in layer_ratios):
            continue
        keep = kept_channels(s.channels, layer_ratios.get(s.node, ratio), multiple)
        if s.channels <= multiple:
            plan.left_alone.append(f"{s.node}: {s.channels} channels, not more than the channel multiple {multiple}")
        elif keep == s.channels:
            plan.left_alone.append(f"{s.node}: ratio removes less than one multiple of {multiple}")
        quota[i] = s.channels - keep
    source_index = np.zeros(len(cg.parent), dtype=int)
    for i, s in enumerate(cg.sources):
        source_index[s.offset: s.offset + s.channels] = i
    removable = []
    for root, atoms in classes.items():
        touched = source_index[atoms]
        if root in blocked or any(not cg.sources[t].prunable for t in touched):
            continue
        removable.append((float(scores[atoms].sum()), root, np.bincount(touched, minlength=len(cg.sources))))
    removed_per_source = np.zeros(len(cg.sources), dtype=int)
    quota_array = np.array([quota.get(i, 0) for i in range(len(cg.sources))])
    chosen = []
    for _, root, counts in sorted(removable, key=lambda item: item[0]):
        if np.all(removed_per_source + counts <= quota_array):
            removed_per_source += counts
            chosen.append(root)
    # Every touched layer must end on a multiple (or untouched); otherwise undo its whole group.
    bad = {i for i, s in enumerate(cg.sources)
           if removed_per_source[i] and (s.channels - removed_per_source[i]) % multiple}
    for root in chosen:
        atoms = classes[root]
        if bad & set(source_index[atoms].tolist()):
            continue
        plan.removed.update(atoms)
    for i in sorted(bad):
        plan.left_alone.append(f"{cg.sources[i].node}: its coupled layers cannot all keep a multiple of {multiple}")
    _describe(cg, plan, blocked)
    return plan


def _explicit_plan(cg: ChannelGraph, removed: dict[str, list[int]]) -> PruningPlan:
    plan = PruningPlan()
    blocked = cg.blocked_roots()
    by_node = {s.node: s for s in cg.sources if s.op_type != "input"}
    classes = cg.classes()
    for node, channels in removed.items():
        if node not in by_node:
            raise HwcError(f"{node} is not a Conv/Gemm/MatMul whose output channels can be pruned")
        source = by_node[node]
        for k in channels:
            root = cg.find(source.offset + k)
            if root in blocked:
                raise HwcError(f"channel {k} of {node} cannot be removed: {blocked[root]}")
            plan.removed.update(classes[root])
    _describe(cg, plan, blocked)
    return plan


def _describe(cg: ChannelGraph, plan: PruningPlan, blocked: dict[int, str]) -> None:
    for s in cg.sources:
        if s.op_type not in ("Conv", "Gemm", "MatMul"):  # a graph input, another op whose channels are blocked
            continue
        atoms = range(s.offset, s.offset + s.channels)
        gone = sum(a in plan.removed for a in atoms)
        reasons = {blocked[cg.find(a)] for a in atoms if cg.find(a) in blocked}
        plan.layers[s.node] = {"op": s.op_type, "before": s.channels, "after": s.channels - gone}
        if reasons and not gone:
            plan.left_alone.append(f"{s.node}: {sorted(reasons)[0]}")


# ------------------------------------------------------------------- rewriting
def _rewrite(graph: Graph, cg: ChannelGraph, keep: np.ndarray) -> list[str]:
    """Slice every tensor the plan touches; return the layers that lost input channels."""
    consumers = []
    for action in cg.actions:
        node = graph.node(action.node)
        mask = keep[action.atoms]
        if mask.all():
            continue
        if action.kind == "in":
            consumers.append(node.name)
        if action.kind in ("out", "in", "param"):
            value = graph.initializer(node.input[action.input_index])
            graph.set_constant_input(node, action.input_index, np.compress(mask, value, axis=action.axis),
                                     f"pruned{action.input_index}")
        if action.kind == "out":
            _prune_bias(graph, node, mask)
        elif action.kind == "depthwise":
            graph.set_constant_input(node, 1, graph.initializer(node.input[1])[mask], "pruned1")
            if len(node.input) > 2 and node.input[2]:
                graph.set_constant_input(node, 2, graph.initializer(node.input[2])[mask], "pruned2")
            graph.set_attr(node, "group", int(mask.sum()))
        elif action.kind == "split":
            sizes = [int(mask[a: b].sum()) for a, b in _split_bounds(graph, node)]
            if len(node.input) > 1 and node.input[1]:
                graph.set_constant_input(node, 1, np.array(sizes, dtype=np.int64), "split")
            else:
                node.input.append(graph.add_initializer(f"{node.name}_split", np.array(sizes, dtype=np.int64)))
    graph.forget_shapes([t for n in graph.nodes for t in n.output])
    return consumers


def _prune_bias(graph: Graph, node: onnx.NodeProto, mask: np.ndarray) -> None:
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return
    bias = graph.initializer(node.input[2])
    if bias.ndim >= 1 and bias.shape[-1] == len(mask):
        graph.set_constant_input(node, 2, np.compress(mask, bias, axis=bias.ndim - 1), "pruned2")


def _split_bounds(graph: Graph, node: onnx.NodeProto) -> list[tuple[int, int]]:
    sizes = [graph.shape(t)[1] for t in node.output]
    ends = np.cumsum(sizes)
    return list(zip(ends - sizes, ends))


# ---------------------------------------------------------------- compensation
def _compensation(graph: Graph, cg: ChannelGraph, removed: set[int]) -> dict[str, np.ndarray]:
    """The constant each removed channel still feeds into the layers that read it.

    Values live per tensor as {position: array over the spatial dims}; they start as the removed
    channel's bias and are pushed through the ops between producer and consumer in numpy.
    Returns, per consumer node, its output's missing contribution ([O] or [O, Ho, Wo]).
    """
    values: dict[str, dict[int, np.ndarray]] = {}
    exact: dict[str, bool] = {}  # every removed channel in the tensor has all-zero filters
    contributions: dict[str, np.ndarray] = {}
    removed_mask = np.zeros(len(cg.parent), dtype=bool)
    removed_mask[list(removed)] = True
    actions = {}
    for a in cg.actions:
        actions.setdefault(a.node, []).append(a)
    for node in graph.topological_order():
        node_actions = actions.get(node.name, [])
        kinds = {a.kind for a in node_actions}
        if "in" in kinds:
            contribution = consumer_contribution(graph, node, values.get(node.input[0]))
            if contribution is not None and contribution.ndim == 3 and not exact.get(node.input[0], False):
                # Filters were not zero, so the channel was never constant: only its mean is known.
                contribution = contribution.mean(axis=(1, 2))
            if contribution is not None:
                contributions[node.name] = contribution
        if "out" in kinds:
            out_action = next(a for a in node_actions if a.kind == "out")
            positions = np.flatnonzero(removed_mask[out_action.atoms])
            values[node.output[0]] = _source_values(graph, node, positions, _positions(graph, cg, node.output[0]))
            weight = graph.initializer(node.input[out_action.input_index])
            exact[node.output[0]] = not np.take(weight, positions, axis=out_action.axis).any()
            continue
        incoming = [values.get(t) for t in node.input]
        if not any(incoming):
            continue
        try:
            result = _propagate(graph, node, incoming, channel_axis(graph, cg, node.output[0]))
        except _Unknown:
            result = None
        if result is not None:
            for t, v in zip(node.output, result):
                if v:
                    values[t] = v
                    exact[t] = all(exact.get(i, False) for i, vals in zip(node.input, incoming) if vals)
    return contributions


class _Unknown(Exception):
    """An op between a removed channel and its consumer that the compensation cannot follow."""


def _positions(graph: Graph, cg: ChannelGraph, tensor: str) -> tuple[int, ...]:
    """The dims a channel's value spans: an image's H, W; a sequence's steps."""
    shape = graph.shape(tensor)
    if not shape:
        return ()
    axis = channel_axis(graph, cg, tensor)
    return tuple(d for i, d in enumerate(shape) if i not in (0, axis))


def _spatial(graph: Graph, tensor: str) -> tuple[int, ...]:
    shape = graph.shape(tensor)
    return tuple(shape[2:]) if shape else ()


def _source_values(graph: Graph, node: onnx.NodeProto, positions: np.ndarray,
                   spatial: tuple[int, ...]) -> dict[int, np.ndarray]:
    bias = None
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        bias = graph.initializer(node.input[2]).astype(np.float64).reshape(-1)
        if node.op_type == "Gemm":
            bias = bias * graph.attr(node, "beta", 1.0)
    return {int(p): np.full(spatial, bias[p] if bias is not None and len(bias) > p else 0.0) for p in positions}


_UNARY = {
    "Relu": lambda v, a: np.maximum(v, 0.0),
    "LeakyRelu": lambda v, a: np.where(v >= 0, v, a.get("alpha", 0.01) * v),
    "Sigmoid": lambda v, a: 1.0 / (1.0 + np.exp(-v)),
    "HardSigmoid": lambda v, a: np.clip(a.get("alpha", 0.2) * v + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda v, a: v * np.clip(v / 6.0 + 0.5, 0, 1),
    "Tanh": lambda v, a: np.tanh(v),
    "Identity": lambda v, a: v,
    "Dropout": lambda v, a: v,
    "Neg": lambda v, a: -v,
    "Abs": lambda v, a: np.abs(v),
    "Exp": lambda v, a: np.exp(v),
    "Elu": lambda v, a: np.where(v > 0, v, a.get("alpha", 1.0) * (np.exp(v) - 1)),
    "Softplus": lambda v, a: np.log1p(np.exp(v)),
    "Erf": lambda v, a: _erf(v),
    "Gelu": lambda v, a: (0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))))
    if a.get("approximate", b"none") in (b"tanh", "tanh") else 0.5 * v * (1 + _erf(v / np.sqrt(2))),
    "Mish": lambda v, a: v * np.tanh(np.log1p(np.exp(v))),
    "Selu": lambda v, a: a.get("gamma", 1.0507) * np.where(v > 0, v, a.get("alpha", 1.67326) * (np.exp(v) - 1)),
    "Celu": lambda v, a: np.maximum(v, 0) + np.minimum(0, a.get("alpha", 1.0) * (np.exp(v / a.get("alpha", 1.0)) - 1)),
    "ThresholdedRelu": lambda v, a: np.where(v > a.get("alpha", 1.0), v, 0.0),
    "Softsign": lambda v, a: v / (1 + np.abs(v)),
    "Sqrt": lambda v, a: np.sqrt(v),
    "Log": lambda v, a: np.log(v),
    "Reciprocal": lambda v, a: 1.0 / v,
    "Sin": lambda v, a: np.sin(v),
    "Cos": lambda v, a: np.cos(v),
    "Floor": lambda v, a: np.floor(v),
    "Ceil": lambda v, a: np.ceil(v),
    "Round": lambda v, a: np.round(v),
    "Sign": lambda v, a: np.sign(v),
}
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
           "Max": np.maximum, "Min": np.minimum, "Pow": np.power}
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _channel_const(value: np.ndarray, position: int, rank: int, axis: int = 1) -> np.ndarray:
    """The part of a broadcast constant that applies to channel ``position`` (on ``axis``), over
    the other dims but the batch."""
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    index = position if full.shape[axis] > 1 else 0
    return np.take(full, index, axis=axis)[0]


def _propagate(graph: Graph, node: onnx.NodeProto, incoming: list, axis: int = 1) -> list[dict[int, np.ndarray]] | None:
    op = node.op_type
    attrs = graph.attrs(node)
    data = incoming[0]
    rank = graph.rank(node.output[0]) or 2
    if op in _UNARY:
        return [{p: _UNARY[op](v, attrs) for p, v in data.items()}]
    if op == "Clip":
        lo = graph.initializer(node.input[1]) if len(node.input) > 1 and node.input[1] else -np.inf
        hi = graph.initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else np.inf
        if lo is None or hi is None:
            raise _Unknown
        return [{p: np.clip(v, lo, hi) for p, v in data.items()}]
    if op == "BatchNormalization":
        g, b, m, var = (graph.initializer(t).astype(np.float64) for t in node.input[1:5])
        eps = attrs.get("epsilon", 1e-5)
        return [{p: (v - m[p]) / np.sqrt(var[p] + eps) * g[p] + b[p] for p, v in data.items()}]
    if op == "PRelu":
        slope = graph.initializer(node.input[1])
        return [{p: np.where(v >= 0, v, v * _channel_const(slope, p, rank, axis)) for p, v in data.items()}]
    if op in _BINARY or op in ("Sum", "Mean"):
        positions = next(v for v in incoming if v).keys()
        out = {}
        for p in positions:
            operands = []
            for t, vals in zip(node.input, incoming):
                if graph.is_constant(t):
                    operands.append(_channel_const(graph.initializer(t).astype(np.float64), p, rank, axis))
                elif vals and p in vals:
                    operands.append(vals[p])
                else:
                    raise _Unknown
            if op in ("Sum", "Mean"):
                total = np.sum(np.broadcast_arrays(*operands), axis=0)
                out[p] = total / len(operands) if op == "Mean" else total
            else:
                out[p] = _BINARY[op](*operands)
        return [out]
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        reduce = np.mean if op == "GlobalAveragePool" else np.max
        return [{p: np.full(_spatial(graph, node.output[0]), reduce(v)) for p, v in data.items()}]
    if op in ("MaxPool", "AveragePool") and rank == 4 and not attrs.get("ceil_mode", 0):
        kernel, strides = attrs["kernel_shape"], attrs.get("strides", [1, 1])
        pads = conv_pads(attrs, _spatial(graph, node.input[0]), kernel, strides, [1, 1])
        mode = "max" if op == "MaxPool" else "avg"
        return [{p: pool2d(v[None], kernel, pads, strides, mode, bool(attrs.get("count_include_pad", 0)))[0]
                 for p, v in data.items()}]
    if op == "Flatten":
        size = int(np.prod(_spatial(graph, node.input[0]) or (1,)))
        return [{p * size + j: np.array(v.reshape(-1)[j]) for p, v in data.items() for j in range(size)}]
    if op == "Concat" and attrs.get("axis", 0) % rank == 1:
        out, offset = {}, 0
        for t, vals in zip(node.input, incoming):
            for p, v in (vals or {}).items():
                out[offset + p] = v
            offset += graph.shape(t)[1]
        return [out]
    if op == "Split" and attrs.get("axis", 0) % rank == 1:
        outs, offset = [], 0
        for t in node.output:
            size = graph.shape(t)[1]
            outs.append({p - offset: v for p, v in data.items() if offset <= p < offset + size})
            offset += size
        return outs
    if op == "Conv" and attrs.get("group", 1) > 1 and rank == 4:  # depthwise: the channel goes too
        weight = graph.initializer(node.input[1]).astype(np.float64)
        bias = graph.initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
        pads = conv_pads(attrs, _spatial(graph, node.input[0]), weight.shape[2:], strides, dilations)
        return [{p: conv2d(v[None], weight[p:p + 1], pads, strides, dilations)[0]
                 + (bias[p] if bias is not None else 0.0) for p, v in data.items()}]
    raise _Unknown


def consumer_contribution(graph: Graph, node: onnx.NodeProto, values: dict[int, np.ndarray] | None):
    if not values:
        return None
    weight = graph.initializer(node.input[1]).astype(np.float64)
    positions = sorted(values)
    if node.op_type == "Conv":
        if weight.ndim != 4:
            return None
        attrs = graph.attrs(node)
        strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
        pads = conv_pads(attrs, _spatial(graph, node.input[0]), weight.shape[2:], strides, dilations)
        stack = np.stack([np.broadcast_to(values[p], _spatial(graph, node.input[0])) for p in positions])
        return conv2d(stack, weight[:, positions], pads, strides, dilations)
    # A channel constant over a sequence's steps (what a removed channel's bias makes) or, where
    # filters were not zero, only its mean is known.
    vector = np.array([float(np.mean(values[p])) for p in positions])
    if node.op_type == "Gemm" and graph.attr(node, "transB", 0):
        weight = weight.T
    scale = graph.attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
    return scale * vector @ weight[positions]


def apply_compensation(graph: Graph, contributions: dict[str, np.ndarray]) -> list[str]:
    notes = []
    for name, contribution in contributions.items():
        if not np.any(contribution):
            continue
        node = graph.node(name)
        dtype = graph.initializer(node.input[1]).dtype
        if contribution.ndim == 3:
            flat = contribution.reshape(contribution.shape[0], -1)
            if np.allclose(flat, flat[:, :1], rtol=1e-6, atol=1e-7 * max(1.0, np.abs(flat).max())):
                contribution = flat[:, 0]
        if contribution.ndim == 1:
            outputs = contribution.shape[0]
            if set_bias(graph, node, bias_value(graph, node, outputs) + contribution, dtype):
                notes.append(f"{name}: removed channels' constant output folded into its bias")
                continue
        shape = contribution.shape if contribution.ndim == 1 else (1,) + contribution.shape
        constant = graph.add_initializer(f"{name}_compensation", contribution.reshape(shape).astype(dtype))
        graph.append_after(node, "Add", [constant], name=f"{name}_compensation")
        notes.append(f"{name}: removed channels' position-dependent output added as a constant map")
    return notes
