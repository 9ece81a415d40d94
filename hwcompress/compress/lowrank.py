"""``hwc lowrank``: the low-rank pass, plain or data-aware, measured against the original model."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..data.calibration import Calibration
from ..model.graph import Graph
from ..passes.lowrank import lowrank, matrix_layers
from .fidelity import output_error, split_feeds
from .recalibrate import keep_if_better
from ..model import reference as ort


def lowrank_model(model: onnx.ModelProto, energy: float = 0.95, rank: int | float | None = None,
                  methods: tuple[str, ...] = ("svd", "spatial", "tucker2"), multiple: int = 1,
                  min_saving: float | None = 0.2, calibration: Calibration | None = None,
                  layers: tuple[str, ...] | None = None, match_statistics: bool = True
                  ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Factorize (every layer, or only ``layers``); with calibration data, also the data-aware
    variant, and keep the better one, then (``match_statistics``) the per-channel output
    statistics matched to the original's where that lowers the held-out error (``recalibrate``)."""
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
    aware = lowrank.apply(model, **knobs, covariances=input_covariances(model, fit))
    plain_error, aware_error = output_error(model, plain.model, held_out), output_error(model, aware.model, held_out)
    report.update({"output_error_plain": plain_error, "output_error_data_aware": aware_error,
                   "data_aware": aware_error <= plain_error, "lowrank": aware.log.to_dict()})
    chosen = aware if aware_error <= plain_error else plain
    report["output_error"] = min(aware_error, plain_error)
    report["lowrank"] = chosen.log.to_dict()
    if not match_statistics:
        return chosen.model, report
    matched, statistics = keep_if_better(model, chosen.model, fit, held_out)
    report |= statistics
    report["output_error"] = min(report["output_error"], statistics["output_error_matched"])
    return matched, report


def input_covariances(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                      max_rows_per_run: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
    """Second moment ``E[x x^T]`` of the input vectors of each matrix layer, over the feeds."""
    graph = Graph(model)
    layers = {name: graph.node(name) for name in matrix_layers(model)}
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in ort.run_with_intermediates(model, feeds, [n.input[0] for n in layers.values()]):
        for name, node in layers.items():
            x = values[node.input[0]].astype(np.float64)
            if node.op_type == "Conv":
                strides = graph.attr(node, "strides", [1, 1])
                x = x[:, :, ::strides[0], ::strides[1]].transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
            else:
                x = x.reshape(-1, x.shape[-1])
            if len(x) > max_rows_per_run:
                x = x[rng.choice(len(x), max_rows_per_run, replace=False)]
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)
    return {name: sums[name] / counts[name] for name in sums}
