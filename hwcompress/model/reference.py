"""Run models with ONNX Runtime: the reference every rewrite and every compiled artifact is checked against."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import HwcError, first_line


def session(model: onnx.ModelProto, threads: int | None = None, exact: bool = False) -> ort.InferenceSession:
    """An ORT CPU session. ``exact`` turns graph optimizations off, so that QDQ runs as written
    (dequantize, float op, quantize) instead of ORT's fused int8 kernels, whose 16-bit
    intermediate sums saturate on CPUs without VNNI."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for every kind of failure
        raise HwcError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], exact: bool = False) -> list[np.ndarray]:
    return _run(session(model, exact=exact), None, feeds)


def _run(sess: ort.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A run whose failure (shapes the model's own weights contradict, ...) is one line about the model."""
    try:
        return sess.run(names, feeds)
    except Exception as exc:  # ORT raises its own exception types for every kind of failure
        raise HwcError(f"ONNX Runtime cannot run the model: {first_line(exc)}") from exc


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds of the model's static input shapes: standard normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    weights = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in weights:
            continue
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if any(d <= 0 for d in dims):
            raise HwcError(f"input {v.name!r} has a dynamic shape; fix it with --input-shape")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[v.name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds


def _comparable(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The finite entries of both, as float64; None where they cannot agree: another shape, or a
    NaN/infinity on one side only (a NaN where the other has a number is a mismatch, never 0 error)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return None
    finite_ref, finite_got = np.isfinite(ref), np.isfinite(got)
    same_special = (np.isnan(ref) & np.isnan(got)) | ((ref == got) & ~finite_ref)
    if np.any((finite_ref != finite_got) | (~finite_ref & ~same_special)):
        return None
    return ref[finite_ref], got[finite_ref]


def relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Max abs difference over all outputs, relative to the reference outputs' max magnitude;
    infinite where shapes differ or one side has a NaN/infinity the other has not."""
    worst = 0.0
    for ref, got in zip(reference, candidate):
        pair = _comparable(ref, got)
        if pair is None:
            return float("inf")
        ref, got = pair
        if ref.size:
            scale = max(float(np.max(np.abs(ref))), 1e-12)
            worst = max(worst, float(np.max(np.abs(ref - got))) / scale)
    return worst


def rms_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """||reference - candidate|| / ||reference|| over all outputs: the typical error, not the worst."""
    pairs = [_comparable(r, c) for r, c in zip(reference, candidate)]
    if any(p is None for p in pairs):
        return float("inf")
    num = sum(float(np.sum((r - c) ** 2)) for r, c in pairs)
    den = sum(float(np.sum(r ** 2)) for r, _ in pairs)
    return float(np.sqrt(num / max(den, 1e-30)))


def require_finite_reference(reference: list[np.ndarray]) -> None:
    """A model whose own outputs (with ONNX Runtime) are all NaN cannot be checked: say so."""
    if any(r.size and not np.isfinite(np.asarray(r, np.float64)).any() for r in reference):
        raise HwcError("ONNX Runtime's outputs of the model are all NaN or infinite on a random input "
                       "(a NaN or infinite weight?); the model cannot be checked, nothing was written")


def run_with_intermediates(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                           tensors: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Values of intermediate tensors (and the outputs), one dict per feed, lazily, from one
    session: a session per feed took 90 % of a MobileNetV2 pruning step (2544 sessions, 70 s)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    names = [o.name for o in probe.graph.output]
    sess = session(probe)
    for feed in feeds:
        yield dict(zip(names, _run(sess, names, feed)))


QUANTIZED_RMS_TOLERANCE = 0.01
NOISE_FLOOR_FACTOR = 2.0
# The input nudge that measures how far one rounding step carries in a quantized graph: what a
# float accumulation in another order moves a conv's output by (some 1e-5 of it over a thousand
# terms). On an int8 YOLO-style detector 1e-7 changed nothing, 1e-6 moved the output 2.0 % RMS on
# one input and 0 on another (no value near a step), 1e-5 2.5 %: the flips, not the nudge, are what
# it measures.
ROUNDING_NUDGE = 1e-5
# float16 values carry 11 significant bits, and ONNX Runtime's CPU kernels compute most float16 ops
# in float32: a float16 build (float32 accumulation) lands about 5e-3 of the output scale from it
# (MobileNetV2, measured), an accumulation in float16 three times further.
FLOAT16_TOLERANCE = 1e-2


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def require_float(model: onnx.ModelProto, doing: str) -> None:
    """One line instead of a pass that finds no constant weights (they are DequantizeLinear's)."""
    if is_quantized(model):
        raise HwcError("the model is already quantized (QuantizeLinear/DequantizeLinear or QOperator nodes); "
                       f"compile it as it is, or give hwc the fp32 model to {doing}")


def is_float16(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


@dataclass
class Reference:
    """ONNX Runtime's outputs for one input and, for a quantized model, how far two correct
    implementations of its QDQ graph may land apart (relative RMS): in a deep int8 network one value
    rounded to the neighbouring step flips more downstream, so they differ at the output by far more
    than one step. Two measures: how far ORT's own fused int8 kernels land from the graph run as
    written (``ort_int8``), and how far the graph's output moves when its input is nudged by a few
    float32 steps (``rounding``): where ORT fuses nothing (an int8 YOLO-style detector: 0.0) the
    second still sees the flips (2.0 %), which a build that accumulates in int32 rather than float
    rounds differently too (1.9 % there)."""

    outputs: list[np.ndarray]
    ort_int8: float | None = None
    rounding: float | None = None
    float16: bool = False

    @property
    def noise_floor(self) -> float | None:
        return None if self.ort_int8 is None else max(self.ort_int8, self.rounding or 0.0)


def reference_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Reference:
    if not is_quantized(model):
        return Reference(run(model, feeds), float16=is_float16(model))
    exact = run(model, feeds, exact=True)
    rng = np.random.default_rng(0)
    nudged = {name: (value * (1 + ROUNDING_NUDGE * rng.standard_normal(value.shape))).astype(value.dtype)
              if np.issubdtype(value.dtype, np.floating) else value for name, value in feeds.items()}
    return Reference(exact, rms_error(exact, run(model, feeds)), rms_error(exact, run(model, nudged, exact=True)))


def check_outputs(model: onnx.ModelProto, reference: Reference, outputs: list[np.ndarray],
                  tolerance: float) -> dict:
    """Compare a compiled artifact's outputs with ONNX Runtime's; raise (one line) above the tolerance.

    A quantized (QDQ) model is held to its RMS error against the QDQ graph run as written, allowed
    up to twice what rounding flips make two correct implementations differ by (``Reference``); a
    float16 model to ``FLOAT16_TOLERANCE`` of the output scale."""
    noise_floor, expected = reference.noise_floor, reference.outputs
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise HwcError(f"tolerance {tolerance}: must be a finite number >= 0")
    require_finite_reference(expected)
    error = relative_error(expected, outputs)
    typical = rms_error(expected, outputs)
    pairs = [_comparable(r, o) for r, o in zip(expected, outputs)]
    abs_error = (float("inf") if any(p is None for p in pairs)
                 else max((float(np.max(np.abs(r - o))) for r, o in pairs if r.size), default=0.0))
    if noise_floor is not None:
        criterion, measured = "relative RMS error (quantized model)", typical
        limit = max(tolerance, QUANTIZED_RMS_TOLERANCE, NOISE_FLOOR_FACTOR * noise_floor)
    elif reference.float16:
        criterion, measured = "max error relative to the output scale (float16 model)", error
        limit = max(tolerance, FLOAT16_TOLERANCE)
    else:
        criterion, measured, limit = "max error relative to the output scale", error, tolerance
    if not measured <= limit:
        raise HwcError(f"the compiled model's outputs differ from ONNX Runtime's: {criterion} {measured:.2e} "
                       f"above the tolerance {limit:g}; nothing was written")
    found = {"max_abs_error": abs_error, "max_relative_error": error, "rms_relative_error": typical,
             "criterion": criterion, "tolerance": limit}
    if noise_floor is not None:
        found["ort_int8_rms_relative_error"] = reference.ort_int8
        found["rounding_rms_relative_error"] = reference.rounding
    return found
