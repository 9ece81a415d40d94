"""``hwc prune``: the pruning pass with reconstruction, measured against the original model."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..errors import HwcError
from ..model import reference as ort
from ..data.calibration import Calibration
from ..model.graph import Graph
from ..passes import fold_batchnorm, prune_channels
from ..passes.base import PassLog, PassResult
from ..passes.channel_groups import analyze
from ..passes.prune_channels import kept_channels
from ..passes.residual_branches import branch_of, residual_branches
from .channel_importance import input_channel_scores
from .fidelity import output_error, split_feeds
from .linear_groups import LinearGroup, linear_group, narrow_groups
from .reconstruct import refit_layers, refittable
from .recalibrate import keep_if_better

# Layers refit after a removed residual branch: the first ones after its Add. MobileNetV2 (83.3 %
# top-1 on 186 ImageNet samples), one of its residual blocks 2-6 removed: the next 4 refit left
# 82.3-84.4 %, the next 8 82.8-84.4 %, at more cost; unrefit 74.2-81.2 %.
REFIT_AFTER_BRANCH = 4


def prune_model(model: onnx.ModelProto, ratio: float, multiple: int = 1, importance: str = "l1",
                layer_ratios: dict[str, float] | None = None, calibration: Calibration | None = None,
                reconstruct: bool = True, match_statistics: bool = True,
                input_scores: dict | None = None, narrow_linear: bool = True) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Prune (BN still in place, so gamma can rank channels), refit consumers, match the per-channel
    output statistics where that lowers the held-out error (``match_statistics``), then fold BN.
    Importance "reconstruction" ranks channels on the calibration data the refit uses; without
    calibration data there is nothing to rank by, and filter L1 norms are used (the report says so).
    ``input_scores``: that ranking computed before on the same model (``input_channel_scores``),
    for a caller that prunes it many ways. ``narrow_linear`` (with calibration data and the refit):
    groups that only linear ops touch keep their best directions rather than a subset of their
    channels (``linear_groups``), after the other groups are pruned."""
    narrowed, asked, before = [], ratio, sum(v.size for v in _weights(model))
    if narrow_linear and reconstruct and calibration is not None:
        if importance != "bn_gamma":  # a BN after a stream's producer is part of it: folded first
            model = fold_batchnorm(model)
        narrowed, ratio, layer_ratios = _split_linear_groups(model, ratio, layer_ratios, multiple)
    rank_by, scores = importance, input_scores
    if importance == "reconstruction" and calibration is None:
        rank_by = "l1"
    elif importance == "reconstruction" and scores is None:
        scores = input_channel_scores(model, split_feeds(calibration)[0],
                                      set(layer_ratios) if layer_ratios and not ratio else None)
    constants = None
    if layer_ratios and 1.0 in layer_ratios.values():
        if calibration is None:
            raise HwcError("a layer ratio of 1 (the layer's residual branch removed) needs calibration data: the "
                           "branch is replaced by its mean on it")
        constants = branch_means(model, [n for n, r in layer_ratios.items() if r == 1.0], split_feeds(calibration)[0])
    if ratio or layer_ratios:
        result = prune_channels.apply(model, ratio=ratio, multiple=multiple, importance=rank_by,
                                      layer_ratios=layer_ratios, input_scores=scores, branch_constants=constants)
    else:  # every group asked for is a linear one, narrowed below
        result = PassResult(model, PassLog("prune_channels", details={"kept_outputs": {}, "consumers": [], "layers": {}}))
    pruned = result.model
    refit = result.log.details["consumers"] + layers_after(pruned, list(result.log.details.get("removed_branches", {})))
    report: dict[str, Any] = {"pruning": result.log.to_dict(), "ratio": asked, "multiple": multiple,
                              "importance": rank_by if rank_by == importance else
                              f"{rank_by} ({importance} ranks channels on calibration data; none given)"}
    if calibration is None:
        feeds = [ort.random_inputs(model, seed) for seed in range(4)]
        report["error_measured_on"] = "4 random inputs (no calibration data)"
        report["output_error"] = output_error(model, pruned, feeds)
    else:
        fit, held_out, where = split_feeds(calibration)
        report["error_measured_on"] = where + (" (random data)" if calibration.is_random else "")
        report["output_error_without_reconstruction"] = output_error(model, pruned, held_out)
        if reconstruct:
            pruned, notes = refit_layers(model, pruned, refit, fit, result.log.details["kept_outputs"])
            report["reconstruction"] = notes
            if narrowed:
                pruned = _narrow(model, pruned, narrowed, fit, result.log.details, report)
            report["output_error_with_reconstruction"] = output_error(model, pruned, held_out)
        if match_statistics:
            pruned, statistics = keep_if_better(model, pruned, fit, held_out, result.log.details["kept_outputs"])
            report |= statistics
        report["output_error"] = output_error(model, pruned, held_out)
    folded = fold_batchnorm(pruned)
    report["parameters_before"] = int(before)
    report["parameters_after"] = int(sum(v.size for v in _weights(folded)))
    return folded, report


def _split_linear_groups(model: onnx.ModelProto, ratio: float, layer_ratios: dict[str, float] | None,
                         multiple: int) -> tuple[list[tuple[str, int]], float, dict[str, float] | None]:
    """(the linear groups to narrow, by first layer, with the directions each keeps, and the ratio
    and per-layer ratios left for channel selection): a global ratio becomes per-layer ratios of the
    other groups."""
    graph = Graph(model)
    cg = analyze(graph)
    asked = dict(layer_ratios or {})
    groups = cg.coupled_layers()
    grouped = {layer for group in groups for layer in group}
    narrowed, rest = [], {layer: r for layer, r in asked.items() if layer not in grouped}
    for group in groups:
        wanted = next((asked[layer] for layer in group if layer in asked), ratio)
        found = linear_group(graph, cg, group) if 0 < wanted < 1 else None
        keep = kept_channels(found.channels, wanted, multiple) if isinstance(found, LinearGroup) else None
        if keep is not None and keep < found.channels:
            narrowed.append((group[0], keep))
        else:
            rest.update({layer: asked.get(layer, ratio) for layer in group if layer in asked or ratio})
    if not narrowed:
        return [], ratio, layer_ratios
    return narrowed, 0.0, rest


def _narrow(original: onnx.ModelProto, pruned: onnx.ModelProto, wanted: list[tuple[str, int]], fit,
            details: dict, report: dict):
    """The linear groups narrowed on the pruned model (found again there: selection may have added
    constant maps to them), their readers refit; the pass log's layers (what the latency table
    prices) and the report say so."""
    graph = Graph(pruned)
    cg = analyze(graph)
    by_first = {group[0]: group for group in cg.coupled_layers()}
    groups, notes = [], {}
    for first, keep in wanted:
        found = linear_group(graph, cg, by_first[first]) if first in by_first else "not a group after pruning"
        if isinstance(found, LinearGroup):
            groups.append((found, keep))
        else:
            notes[first] = f"not narrowed: {found}"
    narrowed, narrowing, done = narrow_groups(pruned, groups, fit)
    notes |= narrowing
    readers = [name for group in done for name, _ in group.readers]
    bases = {layer: group.basis for group in done for layer in group.layers}  # a chain's middle layer is both
    narrowed, refits = refit_layers(original, narrowed, readers, fit, details["kept_outputs"], output_bases=bases)
    report["narrowed_groups"] = notes
    report["narrowed"] = [group.layers[0] for group in done]
    report.setdefault("reconstruction", {}).update(refits)
    ops = {node.name: node.op_type for node in original.graph.node}
    keeps = dict(wanted)
    for group in done:
        details["layers"].update({layer: {"op": ops[layer], "before": group.channels, "after": keeps[group.layers[0]],
                                          "narrowed": True} for layer in group.layers})
    report["pruning"] = report["pruning"] | {"layers": details["layers"]}
    return narrowed


def _weights(model: onnx.ModelProto):
    return [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]


def branch_means(model: onnx.ModelProto, layers: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per residual Add, the mean output of the branch each layer lies on (mean over the samples,
    kept per position) on ``feeds``: what replaces the branch when it is removed."""
    branches = residual_branches(Graph(model))
    chosen = {b.add: b.tensor for b in (branch_of(branches, name) for name in layers) if b is not None}
    totals: dict[str, np.ndarray] = {}
    for values in ort.run_with_intermediates(model, feeds, list(chosen.values())):
        for add, tensor in chosen.items():
            totals[add] = totals.get(add, 0.0) + values[tensor].astype(np.float64).mean(axis=0, keepdims=True)
    return {add: total / len(feeds) for add, total in totals.items()}


def layers_after(model: onnx.ModelProto, adds: list[str], count: int = REFIT_AFTER_BRANCH) -> list[str]:
    """The first ``count`` refittable layers after each of these Adds, in topological order."""
    graph = Graph(model)
    order = graph.topological_order()
    position = {n.name: i for i, n in enumerate(order)}
    chosen: list[str] = []
    for add in adds:
        after = [n.name for n in order[position[add] + 1:] if n.op_type in ("Conv", "Gemm", "MatMul")
                 and refittable(graph, n)]
        chosen += [n for n in after[:count] if n not in chosen]
    return chosen
