"""``hwc lowrank``: the low-rank pass, plain or data-aware, measured against the original model."""

from __future__ import annotations

from typing import Any

import onnx

from .calibration import Calibration
from .passes.lowrank import input_covariances, lowrank
from .pruning import output_error, split_feeds
from . import ort


def lowrank_model(model: onnx.ModelProto, energy: float = 0.95, rank: int | float | None = None,
                  methods: tuple[str, ...] = ("svd", "spatial", "tucker2"), multiple: int = 1,
                  min_saving: float | None = 0.2, calibration: Calibration | None = None,
                  layers: tuple[str, ...] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Factorize (every layer, or only ``layers``); with calibration data, also the data-aware
    variant, and keep the better one."""
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
    if aware_error <= plain_error:
        report["output_error"] = aware_error
        return aware.model, report
    report["output_error"] = plain_error
    report["lowrank"] = plain.log.to_dict()
    return plain.model, report
