"""``hwc lowrank``: the low-rank pass, plain or data-aware, measured against the original model."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..data.calibration import Calibration
from ..model.graph import Graph
from ..passes.layers import bias_value
from ..passes.lowrank import METHODS, LayerStatistics, factorizable_layers, lowrank
from .fidelity import output_error, split_feeds
from .recalibrate import keep_if_better
from .reconstruct import refit_layers, unrolled_patches
from ..model import reference as ort


def lowrank_model(model: onnx.ModelProto, energy: float = 0.95, rank: int | float | None = None,
                  methods: tuple[str, ...] = METHODS, multiple: int = 1,
                  min_saving: float | None = 0.2, calibration: Calibration | None = None,
                  layers: tuple[str, ...] | None = None, match_statistics: bool = True
                  ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Factorize (every layer, or only ``layers``); with calibration data, also the data-aware
    variant, and keep the better one; then the last factor of every factorized layer refit in
    order to the original's outputs (``refit_last_factors``) and (``match_statistics``) the
    per-channel output statistics matched to the original's (``recalibrate``), each kept where it
    lowers the error on the held-out calibration samples."""
    knobs = dict(energy=energy, rank=rank, methods=methods, multiple=multiple, min_saving=min_saving, layers=layers)
    plain = lowrank.apply(model, **knobs)
    report: dict[str, Any] = {"energy": energy, "rank": rank, "methods": list(methods), "multiple": multiple,
                              "lowrank": plain.log.to_dict()}
    if calibration is None:
        feeds = [ort.random_inputs(model, seed) for seed in range(4)]
        report["error_measured_on"] = "4 random inputs (no calibration data)"
        report["output_error"] = output_error(model, plain.model, feeds)
        return plain.model, report
    fit, held_out, where = split_feeds(calibration)
    report["error_measured_on"] = where + (" (random data)" if calibration.is_random else "")
    aware = lowrank.apply(model, **knobs, statistics=layer_statistics(model, fit, layers, methods))
    plain_error, aware_error = output_error(model, plain.model, held_out), output_error(model, aware.model, held_out)
    report.update({"output_error_plain": plain_error, "output_error_data_aware": aware_error,
                   "data_aware": aware_error <= plain_error})
    chosen = aware if aware_error <= plain_error else plain
    report["lowrank"] = chosen.log.to_dict()
    result, error = chosen.model, min(aware_error, plain_error)
    factorized = list(chosen.log.details["layers"])
    if factorized:
        result, notes, kept, refit_error = refit_last_factors(model, result, error, factorized, fit, held_out)
        report.update({"output_error_unrefit": error, "output_error_refit": refit_error, "refit": notes,
                       "refits_kept": kept})
        error = refit_error
    report["output_error"] = error
    if not match_statistics:
        return result, report
    matched, statistics = keep_if_better(model, result, fit, held_out)
    report |= statistics
    report["output_error"] = min(error, statistics["output_error_matched"])
    return matched, report


def layer_statistics(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                     layers: tuple[str, ...] | None = None, methods: tuple[str, ...] = METHODS,
                     max_rows_per_run: int = 2048, seed: int = 0) -> dict[str, LayerStatistics]:
    """Each factorizable layer's (or each of ``layers``') second moments over the feeds
    (``LayerStatistics``): the input vectors of a matrix or 1x1 layer; for a kxk conv its input
    channels, its kh-tall input columns (zero padding included, as the conv reads them: only for
    spatial SVD) and its output channels less the bias (only for Tucker-2)."""
    graph = Graph(model)
    nodes = {name: graph.node(name) for name in factorizable_layers(model) if layers is None or name in layers}
    wanted = sorted({t for n in nodes.values() for t in [n.input[0]] + ([n.output[0]] if _kxk(graph, n) else [])})
    rng = np.random.default_rng(seed)
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[tuple[str, str], int] = {}

    def add(key: tuple[str, str], rows: np.ndarray) -> None:
        if len(rows) > max_rows_per_run:
            rows = rows[rng.choice(len(rows), max_rows_per_run, replace=False)]
        sums[key] = sums.get(key, 0) + rows.T @ rows
        counts[key] = counts.get(key, 0) + len(rows)

    for values in ort.run_with_intermediates(model, feeds, wanted):
        for name, node in nodes.items():
            x = values[node.input[0]].astype(np.float64)
            if node.op_type != "Conv":
                add((name, "inputs"), x.reshape(-1, x.shape[-1]))
                continue
            if not _kxk(graph, node):
                strides = graph.attr(node, "strides", [1, 1])
                add((name, "inputs"), x[:, :, ::strides[0], ::strides[1]].transpose(0, 2, 3, 1).reshape(-1, x.shape[1]))
                continue
            add((name, "inputs"), x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]))
            y = values[node.output[0]].astype(np.float64)
            if "tucker2" in methods:
                bias = bias_value(graph, node, y.shape[1]).astype(np.float64)
                add((name, "outputs"), y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]) - bias)
            if "spatial" in methods:
                add((name, "columns"), _columns(graph, node, x, y.shape[2:], max_rows_per_run, rng))
    return {name: LayerStatistics(**{kind: sums[name, kind] / counts[name, kind] for kind in ("inputs", "columns", "outputs")
                                     if (name, kind) in sums}) for name in nodes}


def _kxk(graph: Graph, node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and graph.initializer(node.input[1]).shape[2:] != (1, 1)


def _columns(graph: Graph, node: onnx.NodeProto, x: np.ndarray, out_hw, count: int, rng) -> np.ndarray:
    """The kh-tall input columns a kxk conv reads at sampled output positions, one row per column
    of the patch: [positions * kw, channels * kh] in (channel, row) order."""
    total = x.shape[0] * out_hw[0] * out_hw[1]
    positions = rng.choice(total, size=min(max(1, count // 2), total), replace=False)
    patches = unrolled_patches(graph, node, x, positions, out_hw)  # [P, C * kh * kw]
    _, channels, kh, kw = graph.initializer(node.input[1]).shape
    return patches.reshape(len(positions), channels, kh, kw).transpose(0, 3, 1, 2).reshape(-1, channels * kh)


def refit_last_factors(original: onnx.ModelProto, factorized: onnx.ModelProto, error: float, layers: list[str],
                       fit: list[dict[str, np.ndarray]], held_out: list[dict[str, np.ndarray]]
                       ) -> tuple[onnx.ModelProto, dict[str, str], list[str], float]:
    """The last factor of each factorized layer refit by least squares, in the network's order, to
    the original layer's output from what the factorized network before it now produces
    (``reconstruct.refit_layers``): the factors are chosen one layer at a time on the original's
    data, while every factorized layer moves the inputs of those after it. A refit is kept only
    where it lowers the model's output error on the held-out samples: a closer pre-activation is
    not always a closer output (SqueezeNet at energy 0.9: 8 of 10 refits lowered it, the last
    conv's, read through a ReLU and a global average, raised it 0.70 -> 0.73). ``error`` is the
    factorized model's held-out error. Returns the model, a note per layer, the refits kept and the
    model's held-out error."""
    graph, reference = Graph(factorized), Graph(original)
    order = {node.output[0]: index for index, node in enumerate(graph.topological_order())}
    last = sorted((graph.producer(reference.node(name).output[0]).name for name in layers),
                  key=lambda name: order[graph.node(name).output[0]])
    current, notes, kept = factorized, {}, []
    for name in last:
        refit, note = refit_layers(original, current, [name], fit, underdetermined=False)
        notes[name] = note.get(name, "not refit")
        if not notes[name].startswith("refit on"):
            continue
        refit_error = output_error(original, refit, held_out)
        notes[name] += f"; held-out output error {error:.3g} -> {refit_error:.3g}" + (
            "" if refit_error < error else ", not kept")
        if refit_error < error:
            current, error = refit, refit_error
            kept.append(name)
    return current, notes, kept, error
