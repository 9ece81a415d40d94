"""``hwc compile`` with a search: profile -> candidates -> measured search -> final compile -> reports,
then the build-pipeline budgets (exit non-zero, after the report is written)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import report_html
from .calibration import load_calibration
from .compile import CompileOptions, compile_model
from .config import get_profile, get_target
from .errors import HwcError
from .fileio import save_model, write_text
from .loading import load_model
from .passes import run_canonical


@dataclass
class SearchOptions:
    profile: str = "default"
    profiles_dirs: list | None = None
    calib: str | None = None
    val: str | None = None
    labels: str | None = None
    preprocess: str | None = None  # for image folders; default: the profile's calibration.preprocess
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    search: bool = True


class BudgetExceeded(HwcError):
    exit_code = 3


def compile_for_target(model_path: str | Path, out_dir: str | Path, options: CompileOptions,
                       search_options: SearchOptions, progress: Callable[[str], None] = lambda _: None
                       ) -> dict[str, Any]:
    """Search (when asked) then compile the chosen model; raise BudgetExceeded after writing."""
    target = get_target(options.target, options.targets_dirs)
    if not search_options.search:
        report = compile_model(model_path, out_dir, options, progress, _html_writer(None))
        _check_budgets(report, None, search_options)
        return report
    from .search import search

    profile = get_profile(target.name, search_options.profile, search_options.profiles_dirs)
    model, _ = run_canonical(load_model(model_path, options.input_shapes))
    preprocess = search_options.preprocess or profile.calibration.get("preprocess")
    calibration = load_calibration(search_options.calib, model, preprocess=preprocess) if search_options.calib else None
    val_inputs, labels = _validation(search_options, model, preprocess)
    budget = search_options.max_accuracy_drop
    if budget is None:
        budget = profile.accuracy_budget.get("max_top1_drop", 1.0)
    progress(f"profile {profile.name} for {target.name}: searching within {budget:g} pt of accuracy")
    result = search(model, target, profile, options, calibration, val_inputs, labels, budget, progress=progress)
    progress(f"chosen: {', '.join(result.applied) or 'nothing (no candidate was measured faster within budget)'}")
    with tempfile.TemporaryDirectory(prefix="hwc-chosen-") as scratch:
        chosen = Path(scratch) / "chosen.onnx"
        save_model(result.model, chosen)
        search_info = result.to_dict() | {"profile": profile.name, "accuracy_budget": budget,
                                          "calibration": calibration.source if calibration else None}
        report = compile_model(chosen, out_dir, options, progress, _html_writer(search_info, model_path))
    _check_budgets(report, search_info, search_options)
    return report


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


def _html_writer(search_info: dict | None, source: str | Path | None = None):
    def extend(report: dict[str, Any], directory: Path) -> None:
        if source is not None:
            report["model"]["path"] = str(source)
        if search_info is not None:
            report["search"] = search_info
        write_text(directory / "report.html", _html(report))
        report["files"]["report.html"] = {"bytes": (directory / "report.html").stat().st_size,
                                          "note": "self-contained report with plots"}
    return extend


def _html(report: dict[str, Any]) -> str:
    lat = report["latency"]
    figure = ("not measured: " + str(lat["reason"])) if lat["median_ms"] is None else (
        f"{lat['median_ms']:.3f} ms ({lat['method']}{', ' + lat['device'] if lat.get('device') else ''})")
    sections = [("Result", report_html.table(["model", "target", "latency", "max rel. error vs ONNX Runtime"], [[
        report["model"]["path"], report["target"]["name"], figure, report["accuracy"]["max_relative_error"]]]))]
    search = report.get("search")
    if search:
        trials = search["trials"]
        sections.append(("Search", report_html.table(
            ["round", "candidate", "latency ms", "table predicts ms", "how", "accuracy", "kept", "chosen", "why not"],
            [[t["round"], t["candidate"], "n/a" if t["latency_ms"] is None else f"{t['latency_ms']:.3f}",
              "" if t.get("predicted_ms") is None else f"{t['predicted_ms']:.3f}",
              t["latency_method"], f"{t['accuracy']:.2f}", t["accepted"], t["chosen"], t["reason"]] for t in trials])))
        checked = [t for t in trials if t.get("predicted_ms") is not None and t["latency_ms"] is not None]
        if checked:
            sections.append(("Latency table vs end-to-end measurement", report_html.table(
                ["candidate", "table predicts ms", "measured ms", "error"],
                [[t["candidate"], f"{t['predicted_ms']:.3f}", f"{t['latency_ms']:.3f}",
                  f"{(t['predicted_ms'] - t['latency_ms']) / t['latency_ms']:+.1%}"] for t in checked])))
        sections.append(("Accuracy vs latency (Pareto front)", report_html.pareto_plot(
            trials, search["pareto"], search["accuracy_metric"], trials[0]["latency_method"])))
        before = trials[0].get("kernels_ms") or {}
        chosen = [t for t in trials if t["chosen"]][-1]
        if before:
            sections.append(("Latency per layer", report_html.kernel_plot(
                before, chosen.get("kernels_ms") or {}, f"baseline vs {chosen['candidate']}")))
    return report_html.render(f"hwc report: {Path(report['model']['path']).name} on {report['target']['name']}",
                              sections)


def _check_budgets(report: dict[str, Any], search: dict | None, options: SearchOptions) -> None:
    latency = report["latency"]["median_ms"]
    if options.max_latency_ms is not None:
        if latency is None:
            raise BudgetExceeded(f"--max-latency-ms {options.max_latency_ms:g}: latency was not measured "
                                 f"({report['latency']['reason']})")
        if latency > options.max_latency_ms:
            raise BudgetExceeded(f"latency {latency:.3f} ms exceeds --max-latency-ms {options.max_latency_ms:g} "
                                 f"by {latency - options.max_latency_ms:.3f} ms (report written)")
    if search is not None and options.max_accuracy_drop is not None:
        drop = search["baseline_accuracy"] - search["accuracy"]
        if drop > options.max_accuracy_drop:
            raise BudgetExceeded(f"accuracy drop {drop:.2f} pt exceeds --max-accuracy-drop "
                                 f"{options.max_accuracy_drop:g} by {drop - options.max_accuracy_drop:.2f} pt")
