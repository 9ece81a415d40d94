"""``hwc quantize``: calibrate, quantize (int8 QDQ, pow2 weights or float16), fall back per layer, measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..data.calibration import Calibration
from ..model.graph import Graph
from ..model.reference import require_float
from ..model.fileio import atomic_path
from ..passes.float16 import float16
from ..passes.quantize import pow2_layer_names, quantizable_layers, quantize, quantize_weight_pow2, weight_axis
from .calibrate import calibrate, layer_sqnr
from .fidelity import output_error, split_feeds


POW2_CODES_METADATA = "hwc.pow2_codes"
# float16 keeps about 3 decimal digits (a layer's output near 60 dB SQNR); a layer far below that is
# one whose values overflow or cancel in half precision, and stays float32.
FLOAT16_MIN_SQNR_DB = 40.0


def quantize_model(model: onnx.ModelProto, calibration: Calibration, scheme: str = "int8",
                   method: str = "percentile", symmetric_activations: bool = False,
                   min_sqnr_db: float | None = None, bias_correction: bool = True,
                   keep_fp32: tuple[str, ...] = (), pow2_layers: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize every layer but ``keep_fp32`` (e.g. those measured slower in int8), and, with
    ``min_sqnr_db``, those whose own quantization error is too large."""
    require_float(model, "quantize")
    fit, held_out, where = split_feeds(calibration)
    if scheme == "float16":  # no ranges to calibrate: the data measure each layer's error
        min_sqnr_db = FLOAT16_MIN_SQNR_DB if min_sqnr_db is None else min_sqnr_db

        def convert(keep: tuple[str, ...]):
            # ONNX Runtime sees float16's rounding only in the simulation: that model is the one scored.
            return float16.apply(model, keep_fp32=keep), float16(model, keep_fp32=keep, simulate=True)
    else:
        stats = calibrate(model, fit, method)
        knobs = dict(stats=stats, scheme=scheme, symmetric_activations=symmetric_activations,
                     bias_correction=bias_correction, pow2_layers=tuple(pow2_layers))

        def convert(keep: tuple[str, ...]):
            result = quantize.apply(model, **knobs, keep_fp32=keep)
            return result, result.model  # QDQ is exact in ONNX Runtime: the model is its own measure
    result, scored = convert(tuple(keep_fp32))
    graph = Graph(model)
    layers = [n.name for n in quantizable_layers(graph)]
    sqnr = layer_sqnr(model, scored, layers, fit[:8])
    fallback: list[str] = []
    if min_sqnr_db is not None:
        inputs_sqnr = layer_sqnr(model, scored, layers, fit[:8], side="input")
        # A layer stays fp32 where it is itself the cause: low output SQNR, well below its input's.
        fallback = [n for n in layers if sqnr[n] < min_sqnr_db and inputs_sqnr[n] - sqnr[n] > 3.0]
        if fallback:
            result, scored = convert(tuple(keep_fp32) + tuple(fallback))
            sqnr = layer_sqnr(model, scored, layers, fit[:8])
    report = {
        "scheme": scheme, "calibration_method": None if scheme == "float16" else method, "calibration": calibration.source,
        "calibration_is_random": calibration.is_random,
        "activations": ("float16" if scheme == "float16" else
                        "int8 symmetric" if symmetric_activations else "uint8 asymmetric"),
        "bias_correction": bias_correction and scheme != "float16", "layer_sqnr_db": sqnr, "fp32_fallback": fallback,
        "kept_fp32": list(keep_fp32),
        "quantize": result.log.to_dict() | {"pow2_codes": None},
        "error_measured_on": where, "output_error": output_error(model, scored, held_out),
    }
    if calibration.is_random and scheme != "float16":
        report["warning"] = "activation scales come from random data, not from real inputs"
    report["pow2_layers"] = sorted(pow2_layer_names(result.model))
    return result.model, report


def pow2_codes(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """The 4-bit codes and per-channel scales of the model's pow2 layers, read back from its weights
    (pow2 values are exact in float32, so this gives the very codes the quantization chose)."""
    graph = Graph(model)
    codes = {}
    for name in sorted(pow2_layer_names(model)):
        node = graph.node(name)
        axis = weight_axis(graph, node)
        q, scale, _ = quantize_weight_pow2(graph.initializer(node.input[1]), axis)
        codes[name] = {"codes": q, "scale": scale, "axis": axis}
    return codes


def attach_pow2_codes(model: onnx.ModelProto, onnx_path: Path) -> Path | None:
    """Write the codes of a pow2 model beside where it will be saved (``NAME.pow2.npz``) and name that
    file in the model's metadata; None for a model without pow2 layers."""
    codes = pow2_codes(model)
    if not codes:
        return None
    sidecar = Path(str(onnx_path) + ".pow2.npz")
    with atomic_path(sidecar) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{layer}.{key}": value for layer, c in codes.items() for key, value in c.items()})
    model.metadata_props.add(key=POW2_CODES_METADATA, value=sidecar.name)
    return sidecar

