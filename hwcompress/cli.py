"""The ``hwc`` command line: argument parsing, progress on stderr, one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import HwcError, first_line
from .progress import Event, Progress


class ProgressLines:
    """Renders progress events on stderr, silent with --quiet.

    Every event is a line (``[hwc   1.2s] message``). A counted event (done of total: tuning trials,
    latency-table layers, search candidates) also drives a progress bar when stderr is a terminal;
    in logs and pipes the lines alone say where the work stands.
    """

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self._start = time.monotonic()
        self._bar = None
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.progress = Progress(self.show)

    def step(self, message: str) -> None:
        self.show(Event(message))

    def show(self, event: Event) -> None:
        if event.warning:
            self.close()
            print(f"hwc: warning: {event.text}", file=self.stream, flush=True)
            return
        if self.quiet:
            return
        line = f"[hwc {time.monotonic() - self._start:6.1f}s] {event.text}"
        if not self._interactive:
            print(line, file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if event.counted:
            if self._bar is None or self._bar.total != event.total or event.done < self._bar.n:
                self.close()
                self._bar = tqdm(total=event.total, file=self.stream, leave=False, dynamic_ncols=True)
            self._bar.set_description_str(event.message[:40])
            self._bar.update(event.done - self._bar.n)
        tqdm.write(line, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    from .report.compile_report import to_json

    print(to_json(data) if args.json else text)


# --------------------------------------------------------------------- commands
def cmd_targets(args: argparse.Namespace) -> int:
    from .config.targets import list_targets

    targets = list_targets(args.targets_dir)
    data = [{"name": t.name, "description": t.description, "latency": t.latency.method,
             "channel_multiple": t.channel_multiple, "dtypes": list(t.dtypes), "source": str(t.source)}
            for t in targets]
    width = max(len(t.name) for t in targets)
    _emit(args, data, "\n".join(f"{t.name:{width}}  {t.description}" for t in targets))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import onnx

    from .model.loading import read_model, unsupported_nodes
    from .model.summary import format_summary, summarize

    model = read_model(Path(args.model))
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise HwcError(f"{args.model}: invalid ONNX model: shape inference failed: {first_line(exc)}") from exc
    info = summarize(model)
    bad = sorted({(f"{n.domain}." if n.domain else "") + n.op_type for n in unsupported_nodes(model)})
    info["unsupported_ops"] = bad
    text = format_summary(info, args.model)
    if bad:
        text += "\n  not supported by hwc (TVM's ONNX importer): " + ", ".join(bad)
    _emit(args, info, text)
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from .model.fileio import check_output_file, save_model
    from .model.loading import load_model, parse_input_shapes
    from .model.reference import random_inputs, relative_error, require_finite_reference, run
    from .passes import run_canonical

    progress = ProgressLines(args.quiet)
    check_output_file(args.output, [args.model])
    shapes = parse_input_shapes(args.input_shape)
    progress.step(f"loading {args.model}")
    model = load_model(args.model, shapes)
    folded, logs = run_canonical(model)
    for log in logs:
        progress.step(f"{log.name}: {len(log.applied)} rewrite(s), {len(log.skipped)} left alone")
    progress.step("checking the result against the original with ONNX Runtime")
    feeds = random_inputs(model)
    original = load_model(args.model, shapes, require_supported=False, simplify=False)
    reference = run(original, feeds)
    require_finite_reference(reference)
    error = relative_error(reference, run(folded, feeds))
    if error > args.tolerance:
        raise HwcError(f"the folded model differs from the original by {error:.2e} (relative), "
                       f"above the tolerance {args.tolerance:g}; nothing was written")
    save_model(folded, args.output)
    progress.step(f"wrote {args.output}")
    data = {"input": args.model, "output": args.output, "max_relative_error": error,
            "nodes_before": len(model.graph.node), "nodes_after": len(folded.graph.node),
            "passes": [log.to_dict() for log in logs]}
    text = (f"{args.output}: {len(model.graph.node)} -> {len(folded.graph.node)} nodes, "
            f"max relative error {error:.1e} vs the original")
    _emit(args, data, text)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .compile import CompileOptions, SearchOptions, compile_for_target
    from .measure.latency import Latency
    from .model.loading import parse_input_shapes

    progress = ProgressLines(args.quiet)
    options = CompileOptions(target=args.target, tune_trials=args.tune_trials, tune_seconds=args.tune_seconds,
                             cache_dir=args.cache_dir,
                             input_shapes=parse_input_shapes(args.input_shape), targets_dirs=args.targets_dir,
                             tolerance=args.tolerance, repeat=args.repeat, device=args.device,
                             int8_compute=not args.no_int8_lowering, winograd=not args.no_winograd,
                             force=args.force)
    search = SearchOptions(profile=args.profile, profiles_dirs=args.profiles_dir, calib=args.calib, val=args.val,
                           labels=args.labels, metric=args.metric, preprocess=args.preprocess,
                           max_accuracy_drop=args.max_accuracy_drop,
                           max_latency_ms=args.max_latency_ms, search_seconds=args.search_seconds,
                           search=args.search or bool(args.calib or args.val))
    result = compile_for_target(args.model, args.output, options, search, progress.progress)
    report = result.report
    latency = Latency(**report["latency"]).describe()
    error = report["accuracy"]["max_relative_error"]
    checked = f"max relative error {error:.1e} vs ONNX Runtime" if error is not None else "outputs not checked"
    chosen = report.get("search", {}).get("applied")
    text = f"{args.output}: {report['target']['name']}: {latency}; {checked}"
    if chosen is not None:
        text += f"; chosen: {', '.join(chosen) or 'no compression'}"
    _emit(args, report, text)
    result.raise_for_budget()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .compile import CompileOptions, SearchOptions
    from .model.loading import parse_input_shapes

    progress = ProgressLines(args.quiet)
    devices = {}
    for spec in args.device or []:
        name, sep, url = spec.partition("=")
        if not sep:
            raise HwcError(f"--device {spec!r}: expected TARGET=rpc://HOST:PORT/KEY")
        devices[name] = url
    options = CompileOptions(tune_trials=args.tune_trials, cache_dir=args.cache_dir,
                             input_shapes=parse_input_shapes(args.input_shape), targets_dirs=args.targets_dir,
                             repeat=args.repeat, force=args.force)
    search = SearchOptions(profile=args.profile, profiles_dirs=args.profiles_dir, calib=args.calib, val=args.val,
                           labels=args.labels, metric=args.metric, preprocess=args.preprocess,
                           search=bool(args.calib or args.val))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise HwcError(f"--targets {args.targets!r}: name at least one target (see hwc targets)")
    rows = compare(args.model, targets, args.output, options, search, devices,
                   progress.progress)
    text = "\n".join(f"{r['target']:10} {('%.3f ms' % r['latency_ms']) if r['latency_ms'] is not None else 'n/a':>12} "
                     f"{r['label']:15} {', '.join(r['passes']) or 'no compression'}" for r in rows)
    _emit(args, rows, text)
    return 0


def _parse_layer_ratios(specs: list[str] | None) -> dict[str, float]:
    ratios = {}
    for spec in specs or []:
        name, sep, value = spec.rpartition("=")
        try:
            ratios[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise HwcError(f"--layer-ratio {spec!r}: expected NODE=RATIO, e.g. conv12=0.5")
        if not 0 < ratios[name] <= 1:
            raise HwcError(f"--layer-ratio {spec!r}: the ratio must be above 0 and at most 1 (1: the residual "
                           "branch the layer lies on removed)")
    return ratios


def _statistics_matching_lines(report: dict) -> list[str]:
    """What per-channel statistics matching (``compress.recalibrate``) did, where it ran."""
    if "statistics_matched" not in report:
        return []
    return [f"  per-channel output statistics matched to the original's: {report['output_error_unmatched']:.3g} "
            f"-> {report['output_error_matched']:.3g}"
            + ("" if report["statistics_matched"] else " (not kept: no better on held-out data)")]


def cmd_prune(args: argparse.Namespace) -> int:
    from .data.calibration import load_calibration
    from .config.targets import get_target
    from .model.fileio import check_output_file, save_model
    from .model.loading import load_model, parse_input_shapes
    from .passes import canonicalize_reshape, eliminate_identity
    from .compress.prune import prune_model
    from .model.reference import require_float

    progress = ProgressLines(args.quiet)
    check_output_file(args.output, [args.model])
    multiple = get_target(args.target, args.targets_dir).channel_multiple if args.target else 1
    layer_ratios = _parse_layer_ratios(args.layer_ratio)
    progress.step(f"loading {args.model}")
    model = canonicalize_reshape(eliminate_identity(load_model(args.model, parse_input_shapes(args.input_shape))))
    require_float(model, "prune (and quantize it afterwards)")
    calibration = load_calibration(args.calib, model, preprocess=args.preprocess) if args.calib else None
    progress.step(f"pruning {args.ratio:g} of the channels (multiple {multiple}, importance {args.importance})")
    pruned, report = prune_model(model, args.ratio, multiple, args.importance, layer_ratios, calibration,
                                 reconstruct=not args.no_reconstruct, narrow_linear=not args.select_only)
    save_model(pruned, args.output)
    progress.step(f"wrote {args.output}")
    report.update({"input": args.model, "output": args.output, "target": args.target})
    layers = report["pruning"]["layers"]
    lines = [f"{args.output}: {report['parameters_before']:,} -> {report['parameters_after']:,} parameters; "
             f"output error {report['output_error']:.3g} (relative RMS, on {report['error_measured_on']})"]
    if "output_error_with_reconstruction" in report:
        lines.append(f"  reconstruction: {report['output_error_without_reconstruction']:.3g} -> "
                     f"{report['output_error_with_reconstruction']:.3g}")
    lines += _statistics_matching_lines(report)
    lines += [f"  residual branch of {add} removed: {', '.join(names)}"
              for add, names in report["pruning"].get("removed_branches", {}).items()]
    lines += [f"  {name}: {info['before']} -> {info['after']}" + (" (narrowed)" if info.get("narrowed") else "")
              for name, info in layers.items() if info["before"] != info["after"] and info["after"]]
    lines += [f"  group of {first}: {note}" for first, note in report.get("narrowed_groups", {}).items()]
    lines += [f"  left alone: {reason}" for reason in report["pruning"]["skipped"]]
    _emit(args, report, "\n".join(lines))
    return 0


def cmd_lowrank(args: argparse.Namespace) -> int:
    from .data.calibration import load_calibration
    from .config.targets import get_target
    from .compress.lowrank import lowrank_model
    from .compress.recipes import LowrankRecipe
    from .model.fileio import check_output_file, save_model
    from .model.loading import load_model, parse_input_shapes
    from .model.reference import require_float
    from .passes import run_canonical

    progress = ProgressLines(args.quiet)
    check_output_file(args.output, [args.model])
    multiple = get_target(args.target, args.targets_dir).rank_multiple if args.target else 1
    progress.step(f"loading {args.model}")
    model, _ = run_canonical(load_model(args.model, parse_input_shapes(args.input_shape)))
    require_float(model, "factorize (and quantize it afterwards)")
    calibration = load_calibration(args.calib, model, preprocess=args.preprocess) if args.calib else None
    rank = None if args.rank is None else (int(args.rank) if args.rank > 1 else float(args.rank))
    methods = tuple(args.method.split(",")) if args.method else LowrankRecipe.default("methods")
    unknown = sorted(set(methods) - set(LowrankRecipe.default("methods")))
    if unknown:
        raise HwcError(f"--method {args.method!r}: unknown method(s) {', '.join(unknown)}; "
                       f"choose from {','.join(LowrankRecipe.default('methods'))}")
    progress.step(f"factorizing (energy {args.energy:g}, methods {', '.join(methods)}, rank multiple {multiple})")
    result, report = lowrank_model(model, args.energy, rank, methods, multiple, args.min_saving, calibration)
    save_model(result, args.output)
    progress.step(f"wrote {args.output}")
    report.update({"input": args.model, "output": args.output, "target": args.target})
    lines = [f"{args.output}: {len(report['lowrank']['layers'])} layer(s) factorized; output error "
             f"{report['output_error']:.3g} (relative RMS, on {report['error_measured_on']})"]
    if "output_error_plain" in report:
        lines.append(f"  factors from the calibration data {report['output_error_data_aware']:.3g}, from the "
                     f"weights alone {report['output_error_plain']:.3g}")
    if "output_error_refit" in report:
        lines.append(f"  last factors refit in order: {len(report['refits_kept'])} of {len(report['refit'])} kept "
                     f"(where the held-out error fell), {report['output_error_unrefit']:.3g} -> "
                     f"{report['output_error_refit']:.3g}")
    lines += _statistics_matching_lines(report)
    lines += [f"  {line}" for line in report["lowrank"]["applied"]]
    lines += [f"  left alone: {line}" for line in report["lowrank"]["skipped"]]
    _emit(args, report, "\n".join(lines))
    return 0


def cmd_device_check(args: argparse.Namespace) -> int:
    import tempfile

    from .config.targets import get_target
    from .config.device import parse_device
    from .measure.rpc import device_check

    progress = ProgressLines(args.quiet)
    device = parse_device(args.device)
    progress.step(f"connecting to the tracker {device.host}:{device.port}")
    with tempfile.TemporaryDirectory() as scratch:
        info = device_check(device, get_target(args.target, args.targets_dir), Path(scratch))
    remote = info["remote"]
    text = (f"{device.url}: key {info['key']}, {info['free_servers']} free server(s); remote TVM "
            f"{remote.get('tvm') or 'unknown'} ({remote.get('machine', remote.get('note', ''))}); local TVM "
            f"{info['local_tvm']}; kernel {'correct' if info['kernel_correct'] else 'WRONG'}, "
            f"{info['kernel_ms']:.4f} ms")
    if info["warning"]:
        print(f"hwc: warning: {info['warning']}", file=sys.stderr)
    _emit(args, info, text)
    return 0 if info["kernel_correct"] else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    from .data.calibration import load_calibration
    from .config.targets import get_target
    from .model.fileio import check_output_file, save_model
    from .model.loading import load_model, parse_input_shapes
    from .passes import run_canonical
    from .compress.quantize import attach_pow2_codes, quantize_model

    progress = ProgressLines(args.quiet)
    check_output_file(args.output, [args.model])
    target = get_target(args.target, args.targets_dir)
    if args.scheme not in target.dtypes:
        raise HwcError(f"target {target.name} does not support {args.scheme} (its dtypes: {', '.join(target.dtypes)})")
    if not args.calib:
        raise HwcError("quantization needs calibration data: --calib data.npz (one array per input), or "
                       "--calib random to accept scales from random data")
    progress.step(f"loading {args.model}")
    model, _ = run_canonical(load_model(args.model, parse_input_shapes(args.input_shape)))
    calibration = load_calibration(args.calib, model, max_samples=args.max_samples, preprocess=args.preprocess)
    progress.step(f"measuring each layer's float16 error on {len(calibration.feeds)} sample(s) from {calibration.source}"
                  if args.scheme == "float16" else
                  f"calibrating ({args.method}) on {len(calibration.feeds)} sample(s) from {calibration.source}")
    quantized, report = quantize_model(model, calibration, args.scheme, args.method,
                                       target.symmetric_activations, args.min_sqnr,
                                       not args.no_bias_correction)
    sidecar = attach_pow2_codes(quantized, Path(args.output))
    if sidecar is not None:
        report["pow2_codes_file"] = str(sidecar)
    save_model(quantized, args.output)
    progress.step(f"wrote {args.output}")
    report.update({"input": args.model, "output": args.output, "target": target.name})
    if report.get("warning"):
        print(f"hwc: warning: {report['warning']}", file=sys.stderr)
    how = ("weights and activations in float16" if args.scheme == "float16" else
           f"{args.method} calibration, {report['activations']} activations")
    lines = [f"{args.output}: {args.scheme} ({how}); "
             f"output error {report['output_error']:.3g} (relative RMS, on {report['error_measured_on']})"]
    lines += [f"  {name}: SQNR {db:.1f} dB" + (" (kept fp32)" if name in report["fp32_fallback"] else "")
              for name, db in report["layer_sqnr_db"].items()]
    _emit(args, report, "\n".join(lines))
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from .model.examples import EXAMPLES
    from .model.fileio import check_output_file, save_model

    check_output_file(args.output)
    knobs = {k: v for k, v in (("input_size", args.input_size), ("classes", args.classes), ("width", args.width))
             if v is not None}  # unset: the example's own default (a detector's classes are not a classifier's)
    model = EXAMPLES[args.name](seed=args.seed, **knobs)
    save_model(model, args.output)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = {"output": args.output, "model": args.name, "input_shape": shape, "seed": args.seed}
    _emit(args, data, f"wrote {args.output}: {args.name} with random weights, input {'x'.join(map(str, shape))}")
    return 0


# ------------------------------------------------------------- argument types
def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` within [low, high] (ends open where asked)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            if low is not None and high is not None:
                ends = " (exclusive)" if low_open and high_open else (
                    f" ({'excluding' if low_open else 'including'} {low:g}, "
                    f"{'excluding' if high_open else 'including'} {high:g})")
                raise argparse.ArgumentTypeError(f"{text} is not between {low:g} and {high:g}{ends}")
            if low is not None:
                raise argparse.ArgumentTypeError(f"{text} must be {'above' if low_open else 'at least'} {low:g}")
            raise argparse.ArgumentTypeError(f"{text} must be {'below' if high_open else 'at most'} {high:g}")
        return value
    return parse


NON_NEGATIVE = _number(float, 0)
POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        print(f"hwc: error: {self.prog.removeprefix('hwc ') or 'hwc'}: {message} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hwc", description="Hardware-aware compression and compilation of ONNX models with Apache TVM.")
    parser.add_argument("--version", action="version", version=f"hwc {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common.add_argument("--targets-dir", action="append", metavar="DIR",
                        help="extra directory of target YAML files (also: HWC_TARGETS_PATH)")
    common.add_argument("--profiles-dir", action="append", metavar="DIR",
                        help="extra directory of profile YAML files (also: HWC_PROFILES_PATH)")
    shapes = _Parser(add_help=False)
    shapes.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                        help="static shape for a dynamic model input (repeatable)")
    data = _Parser(add_help=False)
    data.add_argument("--preprocess", metavar="SPEC",
                      help="how to read a folder of images given as --calib/--val: a preset (torch, caffe, mnist) "
                           "and/or resize=256,crop=224,scale=255,mean=a:b:c,std=a:b:c,order=rgb|bgr,layout=nchw")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def add(name: str, fn: Callable, help_text: str, parents=(common,)) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=list(parents), help=help_text, description=help_text)
        p.set_defaults(func=fn)
        return p

    add("targets", cmd_targets, "list the known targets")

    p = add("inspect", cmd_inspect, "show inputs, outputs, op census, parameters and MACs per layer")
    p.add_argument("model", help="ONNX file (or a model-zoo folder holding model.onnx)")

    p = add("fold", cmd_fold, "run the canonical clean-up passes (BatchNorm folding, ...) alone",
            parents=(common, shapes))
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="where to write the folded ONNX model")
    p.add_argument("--tolerance", type=NON_NEGATIVE, default=1e-4,
                   help="largest accepted output difference relative to the output scale (default 1e-4)")

    from .backend.build import DEFAULT_TUNE_SECONDS, DEFAULT_TUNE_TRIALS
    from .compress.recipes import (CALIBRATION_METHODS, IMPORTANCES, LOWRANK_METHODS, SCHEMES, LowrankRecipe,
                                   PruneRecipe, QuantizeRecipe)

    p = add("compile", cmd_compile, "compile for a target with TVM: tune, build, export, measure, check",
            parents=(common, shapes, data))
    p.add_argument("model")
    p.add_argument("--target", "-t", default="host", help="target name (see 'hwc targets'; default host)")
    p.add_argument("-o", "--output", required=True, help="output directory (replaced atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace the output directory even if it holds files hwc did not write")
    p.add_argument("--tune-trials", type=NON_NEGATIVE_INT, default=DEFAULT_TUNE_TRIALS,
                   help=f"MetaSchedule trials in all (default {DEFAULT_TUNE_TRIALS}; 0 = no tuning, "
                        "use what the tuning database already has)")
    p.add_argument("--tune-seconds", type=NON_NEGATIVE, default=DEFAULT_TUNE_SECONDS,
                   help=f"wall-time budget of the tuning (default {DEFAULT_TUNE_SECONDS:g} s; 0 = none): when spent, "
                        "the build goes on with the records so far and a later compile tunes on")
    p.add_argument("--cache-dir", type=Path, help="tuning database location (default ~/.cache/hwcompress, "
                                                 "or HWC_CACHE_DIR)")
    p.add_argument("--tolerance", type=NON_NEGATIVE, default=1e-3,
                   help="largest accepted output error of the compiled model vs ONNX Runtime, relative to "
                        "the output scale (default 1e-3)")
    p.add_argument("--repeat", type=POSITIVE_INT, default=30, help="timed samples (default 30)")
    p.add_argument("--device", metavar="rpc://HOST:PORT/KEY",
                   help="measure on a device behind a TVM RPC tracker (overrides the target YAML's device)")
    p.add_argument("--no-int8-lowering", action="store_true",
                   help="compile QDQ layers as TVM imports them (float arithmetic) instead of int8 compute")
    p.add_argument("--no-winograd", action="store_true",
                   help="run float 3x3 convs as direct convolutions (Winograd, the default on CPUs, stores "
                        "16/9 (F(2x2, 3x3)) or 4x (F(4x4, 3x3)) of their weights)")
    p.add_argument("--profile", default="default", help="compression profile for the target (default 'default')")
    p.add_argument("--search", action="store_true",
                   help="choose compression by measured latency (on by default with --calib or --val)")
    p.add_argument("--calib", help="calibration data (.npz, or a folder of images with --preprocess) for pruning "
                                   "reconstruction, low-rank and int8")
    p.add_argument("--val", help="validation inputs (.npz or image folder, as --calib) to score accuracy on")
    p.add_argument("--labels", help="class indices (.npy) of the --val samples; without: agreement with "
                                    "the uncompressed model")
    p.add_argument("--metric", help="what accuracy is: top1 (needs --labels), agreement (top-1 agreement with the "
                                    "uncompressed model), fidelity (output cosine similarity, %%), or MODULE:FUNCTION / "
                                    "FILE.py:FUNCTION called as f(outputs, labels) -> number, higher is better "
                                    "(default: top1 with --labels, agreement for a (1, N) output, else fidelity)")
    p.add_argument("--max-accuracy-drop", type=NON_NEGATIVE, help="accuracy budget in points (default: the profile's); "
                                                            "exceeding it exits 3 after writing the report")
    p.add_argument("--max-latency-ms", type=_number(float, 0, low_open=True), help="latency budget; exceeding it exits 3 after writing the report")
    p.add_argument("--search-seconds", type=_number(float, 0, low_open=True),
                   help="wall-time budget of the search (default: the profile's, 600 s for the built-in ones): when "
                        "spent no new candidate is built or priced, and the report lists what was left; the "
                        "final compile's tuning (--tune-seconds) comes after")

    p = add("prune", cmd_prune, "remove whole channels of Conv/Gemm layers (structured pruning)",
            parents=(common, shapes, data))
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--ratio", type=_number(float, 0, 1, high_open=True), required=True, help="fraction of each layer's channels to remove (0..1)")
    p.add_argument("--target", "-t", help="round channel counts to this target's channel multiple")
    p.add_argument("--layer-ratio", action="append", metavar="NODE=RATIO",
                   help="per-layer ratio (repeatable); 1 removes the residual branch the layer lies on")
    p.add_argument("--importance", choices=IMPORTANCES, default=PruneRecipe.default("importance"))
    p.add_argument("--calib", help="calibration data (.npz, one array per input) for reconstruction, or 'random'")
    p.add_argument("--no-reconstruct", action="store_true", help="with --calib: measure only, do not refit")
    p.add_argument("--select-only", action="store_true",
                   help="with --calib: groups only linear ops touch (a linear bottleneck's stream) lose channels "
                        "too, rather than keeping their best directions")

    p = add("lowrank", cmd_lowrank, "factorize Gemm/MatMul/Conv layers into smaller ones (SVD, spatial SVD, "
            "Tucker-2)", parents=(common, shapes, data))
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    energy = LowrankRecipe.default("energies")[0]
    p.add_argument("--energy", type=_number(float, 0, 1, low_open=True), default=energy, help=f"singular-value energy to keep (default {energy:g})")
    p.add_argument("--rank", type=_number(float, 0, low_open=True), help="explicit rank (> 1) or fraction of full rank (<= 1)")
    p.add_argument("--method", help=f"comma-separated subset of {','.join(LOWRANK_METHODS)} (default all)")
    p.add_argument("--target", "-t", help="round ranks up to this target's rank multiple")
    p.add_argument("--min-saving", type=_number(float, 0, 1, high_open=True), default=0.2,
                   help="factorize a layer only if it saves this fraction of its MACs (default 0.2)")
    p.add_argument("--calib", help="calibration data (.npz) for data-aware factors, or 'random'")

    p = add("quantize", cmd_quantize, "quantize Conv/Gemm/MatMul layers: int8 QDQ or pow2 (log) weights",
            parents=(common, shapes, data))
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--scheme", choices=SCHEMES, default=QuantizeRecipe.default("schemes")[0])
    p.add_argument("--calib", help="calibration data (.npz, one array per input), or 'random' (required)")
    calibration = QuantizeRecipe.default("calibration")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default=calibration,
                   help=f"activation range calibration (default {calibration})")
    p.add_argument("--target", "-t", default="host", help="target whose dtypes and activation scheme apply")
    p.add_argument("--min-sqnr", type=_number(float), default=None, metavar="DB",
                   help="keep fp32 the layers whose own quantization leaves less than DB dB of output SQNR")
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--max-samples", type=POSITIVE_INT, default=64, help="calibration samples to use (default 64)")

    p = add("compare", cmd_compare, "compile one model for several targets and compare them side by side",
            parents=(common, shapes, data))
    p.add_argument("model")
    p.add_argument("--targets", default="host,arm-a72,nvidia-t4,npu16")
    p.add_argument("-o", "--output", required=True, help="output directory (one folder per target + comparison.*)")
    p.add_argument("--force", action="store_true",
                   help="replace the output directory even if it holds files hwc did not write")
    p.add_argument("--device", action="append", metavar="TARGET=rpc://HOST:PORT/KEY",
                   help="measure a target on a device (repeatable)")
    p.add_argument("--tune-trials", type=NON_NEGATIVE_INT, default=DEFAULT_TUNE_TRIALS)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--repeat", type=POSITIVE_INT, default=30)
    p.add_argument("--profile", default="default")
    p.add_argument("--calib")
    p.add_argument("--val")
    p.add_argument("--labels")
    p.add_argument("--metric", help="what accuracy is (as for hwc compile)")

    device = sub.add_parser("device", help="check devices behind a TVM RPC tracker")
    device_sub = device.add_subparsers(dest="device_command", metavar="ACTION", required=True, parser_class=_Parser)
    p = device_sub.add_parser("check", parents=[common], help="connect, report the remote TVM, time a kernel",
                              description="connect, report the remote TVM, time a trivial kernel")
    p.set_defaults(func=cmd_device_check)
    p.add_argument("device", metavar="rpc://HOST:PORT/KEY")
    p.add_argument("--target", "-t", default="host", help="target to build the kernel for (default host)")

    from .model.examples import EXAMPLES

    p = add("example", cmd_example, "write an example model (real structure, random weights)")
    p.add_argument("name", choices=sorted(EXAMPLES))
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--input-size", type=_number(int, 8, 4096), help="input height/width, or frames for audio "
                                                                     "(default: the example's own, 224 for classifiers)")
    p.add_argument("--classes", type=_number(int, 1, 100_000), help="output classes (default: the example's own)")
    p.add_argument("--width", type=_number(float, 0, 8, low_open=True), help="channel width multiplier (default: the "
                                                                            "example's own)")
    p.add_argument("--seed", type=int, default=0)
    return parser


@contextlib.contextmanager
def _only_hwc_on_stderr(quiet: bool):
    """With --quiet, what native libraries (TVM, ONNX Runtime, MetaSchedule's workers) and Python
    warnings write to stderr is dropped; hwc's own lines (errors, warnings) still reach it."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError):  # already redirected in Python (an embedding program)
        on_fd2 = False
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    original = sys.stderr
    if on_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr.flush()
        if on_fd2:
            sys.stderr.close()
        sys.stderr = original
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _only_hwc_on_stderr(getattr(args, "quiet", False)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except HwcError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"hwc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): not an error of hwc
        return 0
    except KeyboardInterrupt:
        print("hwc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            raise
        print(f"hwc: internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
