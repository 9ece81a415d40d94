"""``hwc compile``: load -> canonical passes -> TVM import -> tune -> build -> export -> measure -> check.

Everything lands in a temporary directory that replaces the output directory only when the whole
pipeline has succeeded, so a failed compile never leaves a half-written result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .config import Target, get_target, physical_cores
from .errors import HwcError
from .fileio import atomic_dir, save_model
from .loading import load_model
from .measure import LocalMeasurer, Latency, not_measured
from .ort import random_inputs, relative_error, rms_error, run
from .passes import run_canonical
from .report import SCHEMA_VERSION, write_reports
from .summary import summarize

LIBRARY_NAME = "model.so"
ONNX_NAME = "model.onnx"
DEFAULT_TUNE_TRIALS = 500
QUANTIZED_RMS_TOLERANCE = 0.01


@dataclass
class CompileOptions:
    target: str = "host"
    tune_trials: int = DEFAULT_TUNE_TRIALS
    cache_dir: Path | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    targets_dirs: list | None = None
    tolerance: float = 1e-3
    repeat: int = 30
    device: str | None = None  # rpc://HOST:PORT/KEY; default: the target YAML's latency.device
    int8_compute: bool = True  # QDQ Conv/MatMul as integer compute in TVM (int8_lowering)


def compile_model(model_path: str | Path, out_dir: str | Path, options: CompileOptions,
                  progress: Callable[[str], None] = lambda _: None,
                  extend_report: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Compile, measure and check; ``extend_report(report, directory)`` may add to the report and
    write more files before the output directory appears."""
    from . import tvm_build

    import tvm

    target = get_target(options.target, options.targets_dirs)
    target_dict = target.tvm_target_dict()
    tvm_build.check_toolchain(target)
    if options.tune_trials < 0:
        raise HwcError("--tune-trials must be 0 or more")
    progress(f"loading {model_path}")
    model = load_model(model_path, options.input_shapes)
    canonical, logs = run_canonical(model)
    progress("canonical passes: " + ", ".join(f"{l.name} {len(l.applied)}" for l in logs))

    progress("importing into TVM Relax")
    mod = tvm_build.import_onnx(canonical)
    int8_layers = None
    if options.int8_compute and any(n.op_type == "QuantizeLinear" for n in canonical.graph.node):
        from .int8_lowering import lower_qdq

        mod, int8_layers = lower_qdq(mod)
        progress(f"int8 lowering: {len(int8_layers)} QDQ layer(s) run as int8 x int8 -> int32")
    progress(f"lowering for {target.name}")
    kernels = tvm_build.lower(mod, target)
    cache_dir = Path(options.cache_dir) if options.cache_dir else tvm_build.default_cache_dir()
    db_dir = None
    tuning = None
    tuning_note = None
    if tvm_build.is_gpu(target):
        tuning_note = "GPU target: dlight rule-based schedules, no tuning"
    elif target.latency["method"] == "model":
        tuning_note = f"{target.name} has no device: a functional reference build, not tuned"
    else:
        db_dir = tvm_build.tuning_db_dir(cache_dir, target)
        device = options.device or target.latency.get("device")
        if options.tune_trials > 0 and (device or not tvm_build.is_cross(target)):
            tuning = tvm_build.tune(kernels, target, options.tune_trials, db_dir, progress, device)
        elif options.tune_trials > 0:
            tuning_note = (f"{target.name} code cannot run here, so it is tuned only on its device "
                           f"(--device rpc://HOST:PORT/KEY); records already in {db_dir} are used")
            progress(tuning_note)
        else:
            tuning_note = f"--tune-trials 0: no tuning; records already in {db_dir} are used"
    progress(f"building for {target.name}")
    start = time.monotonic()
    executable = tvm_build.build(kernels, target, db_dir)
    build_seconds = time.monotonic() - start

    feeds = random_inputs(canonical, seed=0)
    original = load_model(model_path, options.input_shapes, require_supported=False, simplify=False)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in original.graph.node)
    reference = run(original, feeds, exact=quantized)
    with atomic_dir(out_dir) as tmp:
        save_model(canonical, tmp / ONNX_NAME)
        progress(f"exporting {LIBRARY_NAME}")
        exported = tvm_build.export(executable, target, tmp, LIBRARY_NAME)
        latency, accuracy = _measure_and_check(target, tmp / LIBRARY_NAME, canonical, feeds, reference,
                                               options, progress)
        info = summarize(canonical)
        report = {
            "schema_version": SCHEMA_VERSION,
            "hwc_version": __version__,
            "tvm_version": tvm.__version__,
            "model": {"path": str(model_path), "parameters": info["parameters"], "macs": info["macs"],
                      "inputs": info["inputs"], "outputs": info["outputs"]},
            "target": {"name": target.name, "description": target.description, "tvm": target_dict,
                       "source": str(target.source)},
            "passes": [l.to_dict() for l in logs],
            "tuning": tuning.__dict__ if tuning else None,
            "tuning_note": tuning_note,
            "int8_lowering": None if int8_layers is None else {
                "layers": int8_layers, "note": "QDQ Conv/MatMul run as int8 x int8 -> int32, then scaled per channel"},
            "build_seconds": build_seconds,
            "latency": latency.to_dict(),
            "accuracy": accuracy,
            "files": {name: {"bytes": (tmp / name).stat().st_size, "note": note}
                      for name, note in {ONNX_NAME: "the optimized ONNX model", **exported}.items()},
        }
        if extend_report is not None:
            extend_report(report, tmp)
        write_reports(report, tmp)
    return report


def _measure_and_check(target: Target, library: Path, model, feeds, reference, options: CompileOptions,
                       progress) -> tuple[Latency, dict[str, Any]]:
    """Time the artifact where it can run and check its outputs against ONNX Runtime."""
    method = target.latency["method"]
    device_url = options.device or target.latency.get("device")
    input_names = [v.name for v in model.graph.input]
    if device_url:
        from .remote import RpcMeasurer, parse_device

        device = parse_device(device_url)
        progress(f"measuring on {device.url}")
        latency, outputs = RpcMeasurer(device, target.tvm["target"]["kind"], repeat=options.repeat).measure(
            library, feeds, input_names)
    elif method == "local":
        threads = target.latency.get("threads", "auto")
        threads = physical_cores() if threads == "auto" else int(threads)
        progress(f"measuring on this machine with {threads} thread(s)")
        latency, outputs = LocalMeasurer(threads, repeat=options.repeat).measure(library, feeds, input_names)
    elif method == "model":
        from .latency_model import modelled_latency

        latency, _ = modelled_latency(model, target)
        progress(f"latency from the cycle model: {latency.median_ms:.3f} ms (modelled, not measured)")
        return latency, {"max_abs_error": None, "max_relative_error": None, "tolerance": options.tolerance,
                         "reason": f"{target.name} has no device to run the artifact on"}
    else:
        reason = (f"target {target.name} is measured on a device through an RPC tracker and no device "
                  f"was given (--device rpc://HOST:PORT/KEY)")
        return not_measured(reason), {"max_abs_error": None, "max_relative_error": None,
                                      "tolerance": options.tolerance,
                                      "reason": f"the artifact for {target.name} cannot run on this machine"}
    error = relative_error(reference, outputs)
    typical = rms_error(reference, outputs)
    abs_error = max(float(np.max(np.abs(r - o))) for r, o in zip(reference, outputs))
    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        # The reference runs the QDQ graph as written (ORT's fused int8 kernels saturate); a tie may
        # still round to another int8 step, so a quantized model is held to its RMS error instead.
        criterion, measured = "relative RMS error (quantized model)", typical
        limit = max(options.tolerance, QUANTIZED_RMS_TOLERANCE)
    else:
        criterion, measured, limit = "max error relative to the output scale", error, options.tolerance
    if not measured <= limit:
        raise HwcError(f"the compiled model's outputs differ from ONNX Runtime's: {criterion} {measured:.2e} "
                       f"above the tolerance {limit:g}; nothing was written")
    progress(f"latency {latency.describe()}; max relative error {error:.1e}")
    return latency, {"max_abs_error": abs_error, "max_relative_error": error, "rms_relative_error": typical,
                     "criterion": criterion, "tolerance": limit,
                     "reference": "ONNX Runtime on the original model, same random input"
                                  + (" (graph optimizations off: QDQ as written)" if criterion.endswith("(quantized model)") else ""),
                     "checked_on": latency.device}
