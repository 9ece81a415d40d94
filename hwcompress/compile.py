"""``hwc compile``: load -> canonical passes -> (search) -> build -> measure -> check -> reports -> budgets.

Everything lands in a temporary directory that replaces the output directory only when the whole
pipeline has succeeded, so a failed compile never leaves a half-written result. Budgets are results:
``CompileResult.budget_failures`` lists what was exceeded, and the CLI turns it into exit code 3
after the reports are written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import __version__
from .backend.build import DEFAULT_TUNE_TRIALS, BuildOptions, build_model
from .backend.runtime import tvm_version
from .compress.profile import get_profile
from .compress.quantize import attach_pow2_codes
from .config.targets import Target, get_target
from .data.calibration import load_calibration
from .errors import HwcError
from .measure.factory import check_device, measurer_for
from .measure.latency import Job
from .model.fileio import atomic_dir, check_output_dir, save_model
from .model.loading import ASSUMED_BATCH, load_model
from .model.reference import check_outputs, is_quantized, random_inputs, reference_outputs
from .model.summary import summarize
from .passes import PassLog, run_canonical
from .progress import SILENT, Progress
from .report.compile_report import SCHEMA_VERSION, write_reports

LIBRARY_NAME = "model.so"
ONNX_NAME = "model.onnx"
__all__ = ["DEFAULT_TUNE_TRIALS", "BudgetExceeded", "CompileOptions", "CompileResult", "SearchOptions",
           "compile_for_target", "compile_model"]


@dataclass
class CompileOptions(BuildOptions):
    target: str = "host"
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    targets_dirs: list | None = None
    tolerance: float = 1e-3
    repeat: int = 30
    force: bool = False  # replace an output directory that holds files hwc did not write


@dataclass
class SearchOptions:
    profile: str = "default"
    profiles_dirs: list | None = None
    calib: str | None = None
    val: str | None = None
    labels: str | None = None
    metric: str | None = None      # top1, agreement, fidelity or MODULE:FUNCTION (search.metrics)
    preprocess: str | None = None  # for image folders; default: the profile's calibration.preprocess
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    search_seconds: float | None = None  # the search's wall-time budget (default: the profile's)
    search: bool = True


class BudgetExceeded(HwcError):
    exit_code = 3


@dataclass
class CompileResult:
    report: dict[str, Any]
    budget_failures: list[str] = field(default_factory=list)

    def raise_for_budget(self) -> None:
        if self.budget_failures:
            raise BudgetExceeded("; ".join(self.budget_failures))


def compile_for_target(model_path: str | Path, out_dir: str | Path, options: CompileOptions,
                       search_options: SearchOptions, progress: Progress = SILENT) -> CompileResult:
    """Search (when asked), then compile the chosen model; the budgets' verdict comes back as a value."""
    check_output_dir(out_dir, [model_path], options.force)
    if not (options.tolerance >= 0 and math.isfinite(options.tolerance)):
        raise HwcError(f"--tolerance {options.tolerance}: must be a finite number >= 0")
    if options.repeat < 1:
        raise HwcError(f"--repeat {options.repeat}: must be at least 1")
    target = get_target(options.target, options.targets_dirs)
    check_device(options.device or target.latency.device)
    progress.at("load")(f"loading {model_path}")
    canonical, logs = run_canonical(load_model(model_path, options.input_shapes))
    for prop in canonical.metadata_props:
        if prop.key == ASSUMED_BATCH:
            progress.at("load").warn(f"{model_path}: dynamic batch of {', '.join(json.loads(prop.value))} compiled "
                                     f"as 1 (give --input-shape to choose another)")
    progress.at("passes")("canonical passes: " + ", ".join(f"{l.name} {len(l.applied)}" for l in logs))
    search_info = None
    # What a user would run instead: ONNX Runtime on the model as given (the speed baseline).
    given = load_model(model_path, options.input_shapes, require_supported=False, simplify=False)
    original = given
    if search_options.search:
        canonical, search_info = _search(canonical, target, options, search_options, progress.at("search"))
        original = canonical  # the outputs' reference is the chosen model itself
    report = _compile(canonical, logs, original, given, model_path, out_dir, target, options, progress, search_info)
    return CompileResult(report, _budget_failures(report, search_info, search_options))


def compile_model(model_path: str | Path, out_dir: str | Path, options: CompileOptions,
                  progress: Progress = SILENT) -> dict[str, Any]:
    """Compile without a search or budgets (what benchmarks and tests call)."""
    return compile_for_target(model_path, out_dir, options, SearchOptions(search=False), progress).report


def _search(model: onnx.ModelProto, target: Target, options: CompileOptions, search_options: SearchOptions,
            progress: Progress) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from .search.loop import search
    from .search.metrics import check_metric

    profile = get_profile(target.name, search_options.profile, search_options.profiles_dirs)
    preprocess = search_options.preprocess or profile.preprocess
    calibration = load_calibration(search_options.calib, model, preprocess=preprocess) if search_options.calib else None
    val_inputs, labels = _validation(search_options, model, preprocess)
    check_metric(search_options.metric, labels)
    budget = search_options.max_accuracy_drop
    if budget is None:
        budget = profile.max_accuracy_drop
    progress(f"profile {profile.name} for {target.name}: searching within {budget:g} pt of accuracy")
    result = search(model, target, profile, options, calibration, val_inputs, labels, budget,
                    repeat=options.repeat, tolerance=options.tolerance, progress=progress, metric=search_options.metric,
                    budget_s=search_options.search_seconds)
    progress(f"chosen: {', '.join(result.applied) or 'nothing (no candidate was measured faster within budget)'}")
    info = result.to_dict() | {"profile": profile.name, "accuracy_budget": budget,
                               "calibration": calibration.source if calibration else None}
    return result.model, info


def _validation(options: SearchOptions, model, preprocess: str | None) -> tuple[list | None, np.ndarray | None]:
    if options.labels and not options.val:
        raise HwcError("--labels needs --val (the inputs they label)")
    if not options.val:
        return None, None
    inputs = load_calibration(options.val, model, max_samples=100_000, preprocess=preprocess).feeds
    if not options.labels:
        return inputs, None
    try:
        labels = np.load(options.labels, allow_pickle=False).reshape(-1).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise HwcError(f"--labels {options.labels}: not a readable .npy array of class indices ({exc})") from exc
    return inputs, labels


def _compile(model: onnx.ModelProto, logs: list[PassLog], original: onnx.ModelProto, given: onnx.ModelProto,
             model_path: str | Path,
             out_dir: str | Path, target: Target, options: CompileOptions, progress: Progress,
             search_info: dict[str, Any] | None) -> dict[str, Any]:
    """Build, measure and check ``model``; write the model, library and reports atomically."""
    measurer = measurer_for(target, options.device, options.repeat)
    feeds = random_inputs(model, seed=0)
    quantized = is_quantized(original)
    reference = reference_outputs(original, feeds)
    with atomic_dir(out_dir) as tmp:
        # A short timing (5 samples): the profile only decides what is worth tuning.
        profiler = _untuned_profiler(measurer_for(target, options.device, 5)) if measurer.runs_here else None
        artifact = build_model(model, target, replace(options, profiler=profiler), tmp, LIBRARY_NAME,
                               progress.at("build"))
        progress.at("measure")(f"measuring {measurer.description()}")
        job = Job("model", artifact.library, feeds, artifact.input_names, model)
        measured = measurer.measure(job)
        if measured.outputs is None:
            accuracy = {"max_abs_error": None, "max_relative_error": None, "tolerance": options.tolerance,
                        "reason": measured.reason}
        else:
            accuracy = check_outputs(model, reference, measured.outputs, options.tolerance)
            accuracy |= {"reference": "ONNX Runtime on the original model, same random input"
                                      + (" (graph optimizations off: QDQ as written; the tolerance allows twice how "
                                         "far rounding flips move it: ORT's own int8 kernels, or the input nudged "
                                         "by a few float32 steps)" if quantized else ""),
                         "checked_on": measured.latency.device}
        progress.at("measure")(f"latency {measured.latency.describe()}"
                               + (f"; max relative error {accuracy['max_relative_error']:.1e}"
                                  if accuracy["max_relative_error"] is not None else ""))
        kernels, baseline = {}, None
        if measured.outputs is not None and measurer.runs_here:
            progress.at("measure")("timing each kernel, and ONNX Runtime on the same machine")
            kernels = measurer.kernel_times(job)
            # One round per 6 samples asked for, 1-5: --repeat says how long the user will wait.
            baseline = measurer.baseline(replace(job, model=given), rounds=max(1, min(5, options.repeat // 6)))
        codes = attach_pow2_codes(model, tmp / ONNX_NAME)
        save_model(model, tmp / ONNX_NAME)
        files = {ONNX_NAME: "the optimized ONNX model", **artifact.files}
        if codes is not None:
            files[codes.name] = "4-bit codes and scales of the pow2 layers"
        info = summarize(model)
        report = {
            "schema_version": SCHEMA_VERSION,
            "hwc_version": __version__,
            "tvm_version": tvm_version(),
            "model": {"path": str(model_path), "parameters": info["parameters"], "macs": info["macs"],
                      "inputs": info["inputs"], "outputs": info["outputs"]},
            "target": {"name": target.name, "description": target.description, "tvm": target.tvm_target_dict(),
                       "source": str(target.source)} | ({"hardware_found": target.hardware_found}
                                                        if target.hardware_found else {}),
            "passes": [l.to_dict() for l in logs],
            "tuning": artifact.tuning.__dict__ if artifact.tuning else None,
            "tuning_note": artifact.tuning_note,
            "int8_lowering": None if artifact.int8 is None else {
                "layers": artifact.int8.lowered,
                "kept_float": artifact.int8.kept_float,
                "instructions": artifact.int8.instructions,
                "note": "QDQ Conv/MatMul run as int8 x int8 -> int32, then scaled per channel"},
            "build_seconds": artifact.build_seconds,
            "latency": measured.latency.to_dict(),
            "baseline": baseline,
            "kernels": _kernel_table(kernels, artifact.kernels or {}),
            "accuracy": accuracy,
            "files": {name: {"bytes": (tmp / name).stat().st_size, "note": note} for name, note in files.items()},
        }
        assumed = next((json.loads(p.value) for p in model.metadata_props if p.key == ASSUMED_BATCH), None)
        if assumed:
            report["model"]["batch_assumed"] = assumed
        if search_info is not None:
            report["search"] = search_info
        write_reports(report, tmp)
    return report


def _untuned_profiler(measurer):
    """The model before tuning, timed and profiled kernel by kernel by the compile's own measurer
    (the backend asks it which kernels are too small to tune)."""
    def profile(library: Path, model: onnx.ModelProto) -> tuple[float | None, dict[str, float]]:
        job = Job("untuned", library, random_inputs(model, seed=0), [i.name for i in model.graph.input], model)
        return measurer.measure(job).latency.median_ms, measurer.kernel_times(job)
    return profile


def _kernel_table(kernels: dict[str, float], described: dict[str, dict]) -> list[dict[str, Any]]:
    """Per kernel, slowest first: its time and share, and what it computes (op, shapes, fused ops;
    the VM's own builtins, which the hook times too, are marked as such)."""
    total = sum(kernels.values()) or 1.0
    rows = []
    for name, ms in sorted(kernels.items(), key=lambda item: -item[1]):
        info = described.get(name) or {"op": "VM builtin" if name.startswith("vm.builtin.") else "other",
                                       "inputs": [], "output": None, "fused": [], "schedule": None}
        rows.append({"kernel": name, "ms": ms, "share": ms / total} | info)
    return rows


def _budget_failures(report: dict[str, Any], search: dict | None, options: SearchOptions) -> list[str]:
    failures = []
    latency = report["latency"]["median_ms"]
    if options.max_latency_ms is not None:
        if latency is None:
            failures.append(f"--max-latency-ms {options.max_latency_ms:g}: latency was not measured "
                            f"({report['latency']['reason']})")
        elif latency > options.max_latency_ms:
            failures.append(f"latency {latency:.3f} ms exceeds --max-latency-ms {options.max_latency_ms:g} "
                            f"by {latency - options.max_latency_ms:.3f} ms (report written)")
    if search is not None and options.max_accuracy_drop is not None:
        drop = search["baseline_accuracy"] - search["accuracy"]
        if drop > options.max_accuracy_drop:
            failures.append(f"accuracy drop {drop:.2f} pt exceeds --max-accuracy-drop "
                            f"{options.max_accuracy_drop:g} by {drop - options.max_accuracy_drop:.2f} pt")
    return failures
