"""``hwc prune``: the pruning pass with reconstruction, measured against the original model."""

from __future__ import annotations

from typing import Any

import onnx

from ..model import reference as ort
from ..data.calibration import Calibration
from ..passes import fold_batchnorm, prune_channels
from .channel_importance import input_channel_scores
from .fidelity import output_error, split_feeds
from .reconstruct import refit_layers
from .recalibrate import keep_if_better


def prune_model(model: onnx.ModelProto, ratio: float, multiple: int = 1, importance: str = "l1",
                layer_ratios: dict[str, float] | None = None, calibration: Calibration | None = None,
                reconstruct: bool = True, match_statistics: bool = True,
                input_scores: dict | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Prune (BN still in place, so gamma can rank channels), refit consumers, match the per-channel
    output statistics where that lowers the held-out error (``match_statistics``), then fold BN.
    Importance "reconstruction" ranks channels on the calibration data the refit uses; without
    calibration data there is nothing to rank by, and filter L1 norms are used (the report says so).
    ``input_scores``: that ranking computed before on the same model (``input_channel_scores``),
    for a caller that prunes it many ways."""
    rank_by, scores = importance, input_scores
    if importance == "reconstruction" and calibration is None:
        rank_by = "l1"
    elif importance == "reconstruction" and scores is None:
        scores = input_channel_scores(model, split_feeds(calibration)[0],
                                      set(layer_ratios) if layer_ratios and not ratio else None)
    result = prune_channels.apply(model, ratio=ratio, multiple=multiple, importance=rank_by,
                                  layer_ratios=layer_ratios, input_scores=scores)
    pruned = result.model
    report: dict[str, Any] = {"pruning": result.log.to_dict(), "ratio": ratio, "multiple": multiple,
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
            pruned, notes = refit_layers(model, pruned, result.log.details["consumers"], fit,
                                         result.log.details["kept_outputs"])
            report["reconstruction"] = notes
            report["output_error_with_reconstruction"] = output_error(model, pruned, held_out)
        if match_statistics:
            pruned, statistics = keep_if_better(model, pruned, fit, held_out, result.log.details["kept_outputs"])
            report |= statistics
        report["output_error"] = output_error(model, pruned, held_out)
    before = sum(v.size for v in _weights(model))
    folded = fold_batchnorm(pruned)
    report["parameters_before"] = int(before)
    report["parameters_after"] = int(sum(v.size for v in _weights(folded)))
    return folded, report


def _weights(model: onnx.ModelProto):
    return [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
