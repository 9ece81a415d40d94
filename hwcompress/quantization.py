"""``hwc quantize``: calibrate, quantize (int8 QDQ or pow2 weights), fall back per layer, measure."""

from __future__ import annotations

from typing import Any

import onnx

from .calibration import Calibration
from .graph import Graph
from .passes.quantize import calibrate, layer_sqnr, quantizable_layers, quantize
from .pruning import output_error, split_feeds


def quantize_model(model: onnx.ModelProto, calibration: Calibration, scheme: str = "int8",
                   method: str = "percentile", symmetric_activations: bool = False,
                   min_sqnr_db: float | None = None, bias_correction: bool = True,
                   keep_fp32: tuple[str, ...] = (), pow2_layers: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize every layer but ``keep_fp32`` (e.g. those measured slower in int8), and, with
    ``min_sqnr_db``, those whose own quantization error is too large."""
    fit, held_out, where = split_feeds(calibration)
    stats = calibrate(model, fit, method)
    knobs = dict(stats=stats, scheme=scheme, symmetric_activations=symmetric_activations,
                 bias_correction=bias_correction, pow2_layers=tuple(pow2_layers))
    result = quantize.apply(model, **knobs, keep_fp32=tuple(keep_fp32))
    graph = Graph(model)
    layers = [n.name for n in quantizable_layers(graph)]
    sqnr = layer_sqnr(model, result.model, layers, fit[:8])
    fallback: list[str] = []
    if min_sqnr_db is not None:
        inputs_sqnr = layer_sqnr(model, result.model, layers, fit[:8], side="input")
        # A layer stays fp32 where it is itself the cause: low output SQNR, well below its input's.
        fallback = [n for n in layers if sqnr[n] < min_sqnr_db and inputs_sqnr[n] - sqnr[n] > 3.0]
        if fallback:
            result = quantize.apply(model, **knobs, keep_fp32=tuple(keep_fp32) + tuple(fallback))
            sqnr = layer_sqnr(model, result.model, layers, fit[:8])
    report = {
        "scheme": scheme, "calibration_method": method, "calibration": calibration.source,
        "calibration_is_random": calibration.is_random,
        "activations": "int8 symmetric" if symmetric_activations else "uint8 asymmetric",
        "bias_correction": bias_correction, "layer_sqnr_db": sqnr, "fp32_fallback": fallback,
        "kept_fp32": list(keep_fp32),
        "quantize": result.log.to_dict() | {"pow2_codes": None},
        "error_measured_on": where, "output_error": output_error(model, result.model, held_out),
    }
    if calibration.is_random:
        report["warning"] = "activation scales come from random data, not from real inputs"
    report["pow2_layers"] = sorted(result.log.details.get("pow2_codes", {}))
    return result.model, report | {"_pow2_codes": result.log.details.get("pow2_codes", {})}

