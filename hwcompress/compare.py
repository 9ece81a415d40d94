"""``hwc compare``: one model on several targets, side by side, every latency labelled by how it was
obtained (measured locally, measured over RPC, modelled, or not measured)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .compile import CompileOptions, SearchOptions, compile_for_target
from .config.device import parse_device
from .config.targets import get_target
from .errors import HwcError
from .model.loading import load_model
from .model.fileio import atomic_dir, check_output_dir, write_text
from .progress import SILENT, Progress
from .report import html as report_html
from .report.compile_report import to_json


class SomeTargetsFailed(HwcError):
    exit_code = 4


def _label(latency: dict[str, Any]) -> str:
    return {"local": "measured", "rpc": "measured (rpc)", "model": "modelled"}.get(latency["method"], "not measured")


def compare(model_path: str | Path, targets: list[str], out_dir: str | Path, options: CompileOptions,
            search: SearchOptions, devices: dict[str, str],
            progress: Progress = SILENT) -> list[dict[str, Any]]:
    check_output_dir(out_dir, [model_path], options.force)
    _check_inputs(model_path, targets, options, devices)
    rows: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        for name in targets:
            progress(f"== {name}")
            target_options = replace(options, target=name, device=devices.get(name, options.device))
            try:
                result = compile_for_target(model_path, tmp / name, target_options, search, progress.within(name))
            except HwcError as exc:
                rows.append({"target": name, "error": str(exc), "latency_ms": None,
                             "latency_method": "failed", "label": "failed"})
                continue
            report = result.report
            if result.budget_failures:  # a budget: the report exists, keep the row
                report["budget"] = "; ".join(result.budget_failures)
            lat = report["latency"]
            found = report.get("search") or {}
            rows.append({
                "target": name, "passes": found.get("applied", []), "latency_ms": lat["median_ms"],
                "latency_method": lat["method"], "label": _label(lat), "device": lat.get("device"),
                "reason": lat.get("reason"), "accuracy": found.get("accuracy"),
                "accuracy_drop": found.get("accuracy_drop"), "accuracy_metric": found.get("accuracy_metric"),
                "onnx_bytes": report["files"]["model.onnx"]["bytes"], "library_bytes": report["files"]["model.so"]["bytes"],
                "budget": report.get("budget"),
            })
        write_text(tmp / "comparison.json", to_json(rows) + "\n")
        write_text(tmp / "comparison.md", _markdown(model_path, rows))
        write_text(tmp / "comparison.html", report_html.render(
            f"hwc compare: {Path(model_path).name}",
            [("Targets", report_html.table(*_table(rows))),
             ("Latency", report_html.comparison_plot([r for r in rows if r["latency_ms"] is not None]))]))
    failed = [r for r in rows if "error" in r]
    if failed:
        raise SomeTargetsFailed(f"{len(failed)} of {len(rows)} target(s) failed ({failed[0]['target']}: "
                                f"{failed[0]['error']}); the comparison of the others is in {out_dir}")
    return rows


def _check_inputs(model_path, targets: list[str], options: CompileOptions, devices: dict[str, str]) -> None:
    """Bad input is exit 2 before any target is compiled; 4 stays for a target that fails to build or run."""
    for name in devices:
        if name not in targets:
            raise HwcError(f"--device {name}=...: {name} is not among --targets ({', '.join(targets)})")
    for url in devices.values():
        parse_device(url)
    for name in targets:
        get_target(name, options.targets_dirs)
    load_model(model_path, options.input_shapes)


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["target", "passes chosen", "latency ms", "latency is", "accuracy", "ONNX bytes", "library bytes"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["target"], "-", "-", "failed: " + r["error"], "-", "-", "-"])
            continue
        latency = "n/a" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
        accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.2f} (drop {r['accuracy_drop']:.2f})"
        body.append([r["target"], ", ".join(r["passes"]) or "none", latency,
                     r["label"] + (f": {r['reason']}" if r["label"] == "not measured" else ""),
                     accuracy, f"{r['onnx_bytes']:,}", f"{r['library_bytes']:,}"])
    return headers, body


def _markdown(model_path, rows) -> str:
    headers, body = _table(rows)
    lines = [f"# hwc compare: {model_path}", "", "| " + " | ".join(headers) + " |",
             "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"
