"""Compile reports: ``report.json`` for machines, ``report.md`` for people, from one dict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..model.fileio import write_text
from . import html

SCHEMA_VERSION = 1


def to_json(data: Any) -> str:
    """Strict JSON (RFC 8259) for machines: NaN and infinities, which it cannot hold, become null."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, default=str, allow_nan=False)


def write_reports(report: dict[str, Any], directory: Path) -> None:
    """``report.html``, then ``report.json`` and ``report.md`` (which list the HTML among the files)."""
    write_text(directory / "report.html", render_html(report))
    report["files"]["report.html"] = {"bytes": (directory / "report.html").stat().st_size,
                                      "note": "self-contained report with plots"}
    write_text(directory / "report.json", to_json(report) + "\n")
    write_text(directory / "report.md", render_markdown(report))


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _short(kernel: str, width: int = 32) -> str:
    return kernel if len(kernel) <= width else kernel[:width - 3] + "..."


def _shapes(kernel: dict[str, Any]) -> str:
    """``1x112x112x16 -> 1x112x112x96``: the first input and the output."""
    dims = lambda shape: "x".join(str(d) for d in shape)  # noqa: E731
    inputs, output = kernel.get("inputs") or [], kernel.get("output")
    if not inputs and not output:
        return ""
    return f"{dims(inputs[0]) if inputs else '?'} -> {dims(output) if output else '?'}"


def table_summary(search: dict[str, Any]) -> list[str]:
    """The per-layer latency table's predictions next to the end-to-end measurements they led to."""
    info = search.get("latency_table")
    if not info:
        return []
    checked = [t for t in search["trials"] if t.get("predicted_ms") is not None and t["latency_ms"] is not None]
    lines = [f"Per-layer latency table: `{info['file']}` ({info['method']}, layers tuned with "
             f"{info['layer_trials']} trials each; {info['figures_made_in_this_run']} new figures in this run). "
             f"Sum of the layers: baseline {_ms(info['baseline_predicted_ms'])} ms, chosen "
             f"{_ms(info['chosen_predicted_ms'])} ms (each layer timed alone, as it runs in the model: "
             f"not the end-to-end time; a candidate's prediction is the measured latency scaled by the sum's change).", ""]
    if checked:
        lines += ["| candidate | table predicts ms | measured end to end ms | error |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['candidate']} | {_ms(t['predicted_ms'])} | {_ms(t['latency_ms'])} | "
                  f"{(t['predicted_ms'] - t['latency_ms']) / t['latency_ms']:+.1%} |" for t in checked]
        lines.append("")
    return lines


def allocation_summary(search: dict[str, Any]) -> list[str]:
    """The sensitivity allocation: the ratio chosen per group, beside each group's curve."""
    info = search.get("allocation")
    if not info:
        return []
    if "chosen" not in info:
        return [f"Sensitivity allocation: no allocation kept accuracy at or above {info['floor']:.2f}.", ""]
    lines = [f"Sensitivity allocation (accuracy floor {info['floor']:.2f}, {info['share']:.0%} of the budget): "
             f"{len(info['chosen'])} groups pruned, output error predicted {info['predicted_output_error']:.3f}, "
             f"accuracy {info['accuracy']:.2f} (ONNX Runtime). Each group pruned alone at each ratio: relative "
             f"output error on held-out calibration samples / latency the table predicts it saves; ratio 1: the "
             f"residual branch the group's layer starts removed; narrowed: a group only linear ops touch kept its "
             f"best directions rather than a subset of its channels.", "",
             "| group | chosen ratio | curve (ratio: error / ms saved) |", "| --- | --- | --- |"]
    for curve in info["curves"]:
        points = ", ".join(f"{p['ratio']:g}: {p['output_error']:.3f} / {p['saving_ms']:+.3f}" for p in curve["points"])
        group = curve["group"]
        name = group[0] + (f" (+{len(group) - 1} coupled)" if len(group) > 1 else "")
        chosen = info["chosen"].get(group[0], 0)
        ratio = "1 (branch removed)" if chosen == 1 else f"{chosen:g}" + (" (narrowed)" if group[0] in info.get("narrowed", ())
                                                                         else "")
        lines.append(f"| {name} | {ratio} | {points or 'no step'} |")
    lines.append("")
    lines.append("Probes (bisection over the steps in order of latency saved per error, then the steps after "
                 "the longest good prefix one at a time; steps: accuracy): "
                 + ", ".join(f"{p['steps']}: {p['accuracy']:.2f}" for p in info["probes"]) + ".")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    lat = report["latency"]
    acc = report["accuracy"]
    tuning = report.get("tuning") or {}
    lines = [
        f"# hwc compile report: {Path(report['model']['path']).name} for {report['target']['name']}",
        "",
        f"- target: **{report['target']['name']}** ({report['target']['description']})"
        + (f", on this machine's {report['target']['hardware_found']}" if report['target'].get('hardware_found') else ""),
        f"- TVM {report['tvm_version']}, target `{json.dumps(report['target']['tvm'])}`",
        f"- model: `{report['model']['path']}`, {report['model']['parameters']:,} parameters, "
        f"{report['model']['macs']:,} MACs",
        *([f"- dynamic batch of {', '.join(report['model']['batch_assumed'])} compiled as 1 (no --input-shape "
           f"named it)"] if report["model"].get("batch_assumed") else []),
        "",
        "## Latency",
        "",
    ]
    if lat["median_ms"] is None:
        lines.append(f"**not measured**: {lat['reason']}")
    elif lat["method"] == "model":
        lines.append(f"**modelled, not measured**: {lat['median_ms']:.3f} ms from the {lat['device']}")
    else:
        lines += ["| method | device | threads | median ms | p90 ms | min ms | runs |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {lat['method']} | {lat['device']} | {lat['threads']} | {_ms(lat['median_ms'])} | "
                  f"{_ms(lat['p90_ms'])} | {_ms(lat['min_ms'])} | {lat['repeat']} x {lat['number']} |"]
    base = report.get("baseline")
    if base:
        lines += ["", f"ONNX Runtime on the model as given (before any compression), same machine, inputs and "
                      f"{base['threads']} thread(s): "
                      f"**{base['onnxruntime_ms']:.3f} ms**, TVM {base['tvm_ms']:.3f} ms: **TVM / ONNX Runtime = "
                      f"{base['tvm_over_onnxruntime']:.2f}** (median of {base['rounds']} alternating rounds)."]
    kernels = report.get("kernels") or []
    if kernels:
        lines += ["", "## Time per kernel", "",
                  "Each fused TVM kernel timed alone in the running model (the VM's instrument hook: figures include "
                  "a return to Python between kernels, so they add up to more than the latency; compare them "
                  "with each other). Shapes: the kernel's first input and its output (NHWC for convs); fused: "
                  "the ops computed in the same kernel, in order; schedule: the project's own kernel (register-"
                  "blocked conv, or a 3x3 conv by Winograd's F(m x m, 3x3)) or MetaSchedule's.", "",
                  "| kernel | op | shapes | fused | schedule | ms | share |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| `{_short(k['kernel'])}` | {k.get('op', '')} | {_shapes(k)} | {', '.join(k.get('fused') or [])} | "
                  f"{k.get('schedule') or ''} | {k['ms']:.3f} | {k['share']:.0%} |" for k in kernels[:20]]
        if len(kernels) > 20:
            lines.append(f"| ({len(kernels) - 20} more) | | | | | {sum(k['ms'] for k in kernels[20:]):.3f} | "
                         f"{sum(k['share'] for k in kernels[20:]):.0%} |")
    lines += ["", "## Accuracy", ""]
    if acc["max_abs_error"] is None:
        lines.append(f"**not checked**: {acc['reason']}")
    else:
        lines.append(f"Compiled artifact vs ONNX Runtime on the original model, same input: max abs error "
                     f"{acc['max_abs_error']:.3g} ({acc['max_relative_error']:.3g} relative to the output scale; "
                     f"tolerance {acc['tolerance']:g})." + (f" Outputs computed on: {acc['checked_on']}."
                                                            if acc.get("checked_on") else ""))
    lines += ["", "## Tuning", ""]
    if tuning:
        lines.append(f"{tuning['tasks']} kernels; {tuning['records_reused']} reused from the database, "
                     f"{tuning['trials_run']} trials run of {tuning['trials_requested']} allowed, "
                     f"{tuning['seconds']:.0f} s. Database: `{tuning['database']}`.")
        if tuning.get("stopped"):
            lines.append(f"Stopped early: {tuning['stopped']}.")
        if tuning.get("defaults_kept"):
            lines.append(f"{tuning['defaults_kept']} kernel(s) kept the rule-based default schedule: no tuning "
                         f"candidate measured faster than it.")
        if tuning.get("negligible"):
            lines.append(f"{tuning['negligible']} kernel(s) not tuned: each took under 1% of the model's time in its "
                         f"per-kernel profile before tuning (the model ran {tuning['model_ms']:.3f} ms), less than "
                         f"tuning could save.")
    else:
        lines.append(report.get("tuning_note", "no tuning"))
    lowering = report.get("int8_lowering")
    if lowering is not None:
        lines += ["", "## int8", "", f"{len(lowering['layers'])} layer(s) lowered to integer compute "
                  f"({lowering['note']}): {', '.join(lowering['layers']) or 'none matched'}."]
        if lowering.get("instructions"):
            lines += ["", f"int8 kernels on this target: {lowering['instructions']}."]
        if lowering.get("kept_float"):
            lines += ["", "Kept in float (dequantized weights, measured as they are):", ""]
            lines += [f"- {why}" for why in lowering["kept_float"]]
    search = report.get("search")
    if search:
        lines += ["", "## Search", "",
                  f"Profile `{search['profile']}`, accuracy budget {search['accuracy_budget']:g} pt "
                  f"({search['accuracy_metric']}, measured on the {search['accuracy_measured_on']}). "
                  f"Chosen: **{', '.join(search['applied']) or 'no compression'}**: "
                  f"{_ms(search['baseline_latency_ms'])} -> {_ms(search['latency_ms'])} ms, accuracy "
                  f"{search['baseline_accuracy']:.2f} -> {search['accuracy']:.2f}. Search latencies are untuned "
                  f"builds (every candidate alike), each timed in alternating rounds beside the model it would "
                  f"replace (that ratio times the replaced model's figure); the latency above is the chosen "
                  f"model's, tuned.", "",
                  *_budget_lines(search),
                  *_fidelity_lines(search),
                  *table_summary(search), *allocation_summary(search),
                  "| round | candidate | latency ms | table predicts ms | how | accuracy | kept | chosen | why not |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {t['round']} | {t['candidate']} | {_ms(t['latency_ms'])} | {_ms(t.get('predicted_ms'))} | "
                  f"{t['latency_method']} | {t['accuracy']:.2f} | {'yes' if t['accepted'] else 'no'} | "
                  f"{'yes' if t['chosen'] else ''} | {t['reason']} |" for t in search["trials"]]
    lines += ["", "## Passes", ""]
    for p in report["passes"]:
        lines.append(f"- `{p['pass']}`: {len(p['applied'])} rewrite(s), {len(p['skipped'])} left alone")
    lines += ["", "## Files", ""]
    for name, info in report["files"].items():
        lines.append(f"- `{name}`: {info['bytes']:,} bytes" + (f" ({info['note']})" if info.get("note") else ""))
    return "\n".join(lines) + "\n"


def _budget_lines(search: dict) -> list[str]:
    if search.get("budget_s") is None:
        return []
    left = [t for t in search["trials"] if t["latency_method"] == "budget"]
    line = f"Search time: {search['spent_s']:.0f} s of its {search['budget_s']:g} s budget"
    if search.get("stopped"):
        line += (f"; stopped: {search['stopped']}, {len(left)} candidate(s) left unevaluated "
                 f"(a later run with --search-seconds larger, or the same cache, goes further)")
    return [line + ".", ""]


def render_html(report: dict[str, Any]) -> str:
    lat = report["latency"]
    figure = ("not measured: " + str(lat["reason"])) if lat["median_ms"] is None else (
        f"{lat['median_ms']:.3f} ms ({lat['method']}{', ' + lat['device'] if lat.get('device') else ''})")
    base = report.get("baseline") or {}
    sections = [("Result", html.table(
        ["model", "target", "latency", "ONNX Runtime here", "TVM / ONNX Runtime", "max rel. error vs ONNX Runtime"],
        [[report["model"]["path"], report["target"]["name"], figure,
          f"{base['onnxruntime_ms']:.3f} ms" if base else "n/a",
          f"{base['tvm_over_onnxruntime']:.2f}" if base else "n/a", report["accuracy"]["max_relative_error"]]]))]
    kernels = report.get("kernels") or []
    if kernels:
        labels = {f"{rank}. {k.get('op', '')} {_shapes(k)}".strip(): k["ms"] for rank, k in enumerate(kernels, 1)}
        sections.append(("Time per kernel", html.bar_plot(labels, "fused TVM kernels, timed in the running model",
                                                          "ms per run (instrumented)")))
        sections.append(("Kernels", html.table(
            ["#", "kernel", "op", "shapes (first input -> output)", "fused", "schedule", "ms", "share"],
            [[rank, k["kernel"], k.get("op", ""), _shapes(k), ", ".join(k.get("fused") or []), k.get("schedule") or "",
              f"{k['ms']:.3f}", f"{k['share']:.0%}"] for rank, k in enumerate(kernels, 1)])))
    search = report.get("search")
    if search:
        trials = search["trials"]
        sections.append(("Search", html.table(
            ["round", "candidate", "latency ms", "table predicts ms", "how", "accuracy", "kept", "chosen", "why not"],
            [[t["round"], t["candidate"], "n/a" if t["latency_ms"] is None else f"{t['latency_ms']:.3f}",
              "" if t.get("predicted_ms") is None else f"{t['predicted_ms']:.3f}",
              t["latency_method"], f"{t['accuracy']:.2f}", t["accepted"], t["chosen"], t["reason"]] for t in trials])))
        checked = [t for t in trials if t.get("predicted_ms") is not None and t["latency_ms"] is not None]
        if checked:
            sections.append(("Latency table vs end-to-end measurement", html.table(
                ["candidate", "table predicts ms", "measured ms", "error"],
                [[t["candidate"], f"{t['predicted_ms']:.3f}", f"{t['latency_ms']:.3f}",
                  f"{(t['predicted_ms'] - t['latency_ms']) / t['latency_ms']:+.1%}"] for t in checked])))
        sections.append(("Accuracy vs latency (Pareto front)", html.pareto_plot(
            trials, search["pareto"], search["accuracy_metric"], trials[0]["latency_method"])))
        before = trials[0].get("kernels_ms") or {}
        chosen = [t for t in trials if t["chosen"]][-1]
        if before:
            sections.append(("Latency per layer", html.kernel_plot(
                before, chosen.get("kernels_ms") or {}, f"baseline vs {chosen['candidate']}")))
    return html.render(f"hwc report: {Path(report['model']['path']).name} on {report['target']['name']}", sections)


def _fidelity_lines(search: dict) -> list[str]:
    """The chosen model's outputs against the uncompressed model's, per output (any model kind)."""
    chosen = [t for t in search["trials"] if t.get("chosen") and t.get("fidelity")]
    if not chosen:
        return []
    fidelity = chosen[-1]["fidelity"]
    per_output = ", ".join(f"output {i}: " + ("identical" if sqnr is None else f"SQNR {sqnr:.1f} dB, cosine {cosine:.4f}")
                           for i, (sqnr, cosine) in enumerate(zip(fidelity["sqnr_db"], fidelity["cosine"])))
    return [f"Outputs of the chosen model vs the uncompressed one on the same inputs: {per_output}.", ""]
