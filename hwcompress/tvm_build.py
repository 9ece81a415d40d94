"""ONNX -> TVM Relax -> (tuned) library for a target.

``lower`` makes the fused kernels once; ``tune`` and ``build`` both take them. On CPU targets
convolutions run in NHWC with the project's register-blocked schedule (``cpu_schedules``, dense and
depthwise); the other kernels are tuned with MetaSchedule into a persistent database, one per
target, TVM version, kernel form and thread count under the cache directory. MetaSchedule keys
records by the structural hash of each fused kernel, so a later compile of the same model, or of
another model with the same layer shapes, reuses them. GPU targets get dlight's rule-based schedules (no tuning; building needs no GPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .config import Target
from .errors import HwcError, first_line


def ms_build(mod, target, _params):
    """MetaSchedule builder that skips ``import tvm.s_tir.tensor_intrin``.

    The default builder imports it in every worker (~35 s here) and then hits its own timeout;
    this project's CPU schedules use no tensor intrinsics.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def ms_export(compiler: str | None, module) -> str:
    """MetaSchedule export to a linked shared library (cross-linked for cross targets), so that a
    board running only TVM's runtime can load it without a compiler of its own."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="hwc-ms-"), "kernel.so")
    if compiler:
        from tvm.support import cc

        module.export_library(path, fcompile=cc.cross_compiler(compiler))
    else:
        module.export_library(path)
    return path


def is_cross(target: Target) -> bool:
    """Code for another machine: it can only run (and so be tuned) on that machine."""
    return bool(target.tvm.get("cross_compiler")) or is_gpu(target)


def default_cache_dir() -> Path:
    base = os.environ.get("HWC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hwcompress")
    return Path(base)


# Bumped when the kernels handed to MetaSchedule change form (layout, hand schedules, thread
# count of the runner), so that records tuned for the old form are not mixed with new ones.
KERNEL_FORM = "nhwc-blocked-conv-1"


def tuning_db_dir(cache_dir: Path, target: Target) -> Path:
    """One MetaSchedule database per (TVM version, resolved target, kernel form, runner threads)."""
    import tvm

    key = json.dumps({"tvm": tvm.__version__, "target": target.tvm_target_dict(), "kernels": KERNEL_FORM,
                      "threads": os.environ.get("TVM_NUM_THREADS")}, sort_keys=True)
    return Path(cache_dir) / "tuning" / f"{target.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def import_onnx(model: onnx.ModelProto):
    """The Relax module of an ONNX model, weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with _clip_as_relax_ops():
            return from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # the importer raises many types for unsupported constructs
        raise HwcError(f"TVM cannot import the model: {type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager
def _clip_as_relax_ops():
    """Import Clip with constant bounds as Relax ``maximum``/``minimum`` ops.

    TVM 0.27's importer emits every Clip as opaque ``call_tir`` kernels; layout conversion cannot
    see through them, so each ReLU6 of an NHWC MobileNetV2 sat between two transposes (a fifth of
    its run time). Bounds that are not constants keep the importer's own conversion."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend.Clip._impl_v13

    def clip(cls, bb, inputs, attr, params):
        bounds = inputs[1:3] + [None] * (3 - len(inputs))
        if not all(b is None or isinstance(b, tvm.ir.expr.Constant) and b.value.numpy().size == 1 for b in bounds):
            return original.__func__(cls, bb, inputs, attr, params)
        result = inputs[0]
        for bound, op in zip(bounds, (relax.op.maximum, relax.op.minimum)):
            if bound is not None and not np.isnan(bound.value.numpy()).any():  # NaN: unbounded, as in ORT
                result = bb.emit(op(result, relax.const(bound.value.numpy().reshape(()), bound.value.dtype)))
        return result

    onnx_frontend.Clip._impl_v13 = classmethod(clip)
    try:
        yield
    finally:
        onnx_frontend.Clip._impl_v13 = original


@dataclass
class TuningResult:
    tasks: int
    trials_requested: int
    trials_run: int
    records_reused: int
    seconds: float
    database: str


def tune(kernels, target: Target, trials: int, db_dir: Path,
         progress: Callable[[str], None] = lambda _: None, device: str | None = None) -> TuningResult:
    """Tune every fused kernel of ``kernels`` (from ``lower``) that has no schedule yet with
    MetaSchedule, adding to ``db_dir``.

    Candidates run on this machine, or on ``device`` (rpc://HOST:PORT/KEY) through TVM's
    RPCRunner; a cross target is only tuned on its device."""
    import tvm.s_tir.meta_schedule as ms

    from .cpu_schedules import is_scheduled

    tvm_target = target.tvm_target()
    if "num-cores" not in target.tvm_target_dict():
        raise HwcError(f"target {target.name} cannot be tuned: its TVM target has no num-cores "
                       f"(add num-cores: auto to {target.source})")
    start = time.monotonic()
    tasks = [task for task in ms.relax_integration.extract_tasks(kernels, tvm_target)
             if not is_scheduled(task.dispatched[0]["main"])]
    db_dir.mkdir(parents=True, exist_ok=True)
    database = _open_database(db_dir)
    known = [t for t in tasks if _has_record(database, t, tvm_target)]
    tunable = [t for t in tasks if not _has_record(database, t, tvm_target)]
    progress(f"tuning: {len(tasks)} kernels, {len(known)} already in the database, "
             f"{len(tunable)} to tune with up to {trials} trials")
    run = 0
    if tunable and trials > 0:
        # Every kernel gets an equal share: a budget spent on a few kernels leaves the rest naive.
        per_task = max(1, -(-trials // len(tunable)))
        callback = _progress_callback(progress, per_task * len(tunable))
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        import functools

        builder = ms.builder.LocalBuilder(
            f_build=ms_build, f_export=functools.partial(ms_export, target.tvm.get("cross_compiler")),
            timeout_sec=300, max_workers=min(os.cpu_count() or 1, 4))
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
        if device:
            from .remote import parse_device

            remote = parse_device(device)
            runner = ms.runner.RPCRunner(ms.runner.RPCConfig(remote.host, remote.port, remote.key,
                                                             session_timeout_sec=120), evaluator_config=evaluator)
        else:
            runner = ms.runner.LocalRunner(evaluator_config=evaluator)
        with contextlib.redirect_stdout(sys.stderr), _named_handlers_only(logging.getLogger("tvm.s_tir.meta_schedule")):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tunable, str(db_dir))
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(db_dir), max_trials_global=per_task * len(tunable), max_trials_per_task=per_task,
                num_trials_per_iter=min(per_task, 32),
                builder=builder, runner=runner, database=database, cost_model=ms.cost_model.XGBModel(),
                measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [callback],
            )
        run = callback.count
    return TuningResult(tasks=len(tasks), trials_requested=trials, trials_run=run, records_reused=len(known),
                        seconds=time.monotonic() - start, database=str(db_dir))


def lower(mod, target: Target):
    """The fused kernels of ``mod`` for ``target``, done once and shared by ``tune`` and ``build``
    (so that the database's records match the kernels that are built): on CPUs ``cpu_kernels``,
    on GPUs dlight's rule-based schedules."""
    import tvm
    from tvm import relax

    tvm_target = target.tvm_target()
    with _as_build_error(target), tvm_target, tvm.transform.PassContext(opt_level=3):
        if not is_gpu(target):
            return cpu_kernels(mod, tvm_target)
        import tvm.s_tir.dlight as dl

        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(relax.get_pipeline("zero")(mod))


def cpu_kernels(mod, tvm_target):
    """The fused kernels of ``mod`` for a CPU: convolutions in NHWC and register-blocked by
    ``cpu_schedules``, their weights repacked at compile time, the rest left for MetaSchedule."""
    import tvm
    from tvm import relax

    from .channel_padding import pad_output_channels
    from .cpu_schedules import VectorUnit, nhwc_layout, schedule_convolutions

    lanes = VectorUnit.of(tvm_target).lanes
    lowered = relax.get_pipeline("zero")(pad_output_channels(nhwc_layout(mod), lanes))
    with tvm_target:
        scheduled = schedule_convolutions(lowered, tvm_target)
    # The convs' weight repacking becomes functions of the constant weights, run at compile time.
    prepack = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant(),
                                        relax.transform.DeadCodeElimination()])
    return prepack(scheduled)


def build(kernels, target: Target, db_dir: Path | None):
    """Compile ``kernels`` (from ``lower``), on CPUs with the tuned records in ``db_dir``."""
    import tvm
    from tvm import relax

    tvm_target = target.tvm_target()
    with _as_build_error(target), tvm_target, tvm.transform.PassContext(opt_level=3):
        if not is_gpu(target) and db_dir is not None and (db_dir / "database_tuning_record.json").exists():
            kernels = relax.transform.MetaScheduleApplyDatabase(str(db_dir))(kernels)
        return tvm.compile(kernels, target=tvm_target)


@contextlib.contextmanager
def _as_build_error(target: Target):
    """TVM's own exceptions from lowering or compiling, as the one-line error the CLI prints."""
    try:
        yield
    except HwcError:
        raise
    except Exception as exc:
        raise HwcError(f"TVM build for {target.name} failed: {type(exc).__name__}: "
                       f"{first_line(exc, last=True)}") from exc


def export(executable, target: Target, directory: Path, name: str) -> dict[str, str]:
    """Write the shared library (cross targets: linked by their cross compiler) and, for CUDA, the
    device code compiled by nvcc. Returns the files written, each with a note for the report."""
    path = directory / name
    compiler = target.tvm.get("cross_compiler")
    if compiler:
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    else:
        executable.export_library(str(path))
    files = {name: f"TVM library for {target.name}"}
    if target.tvm["target"]["kind"] == "cuda":
        arch = target.tvm["target"].get("arch", "sm_75")
        fatbin = f"{Path(name).stem}.{arch}.fatbin"
        (directory / fatbin).write_bytes(_nvcc_fatbin(executable, target))
        files[fatbin] = (f"CUDA kernels compiled by nvcc for {arch}; {name} holds the host code and the "
                         f"kernels' CUDA source (this TVM wheel has no CUDA runtime)")
    return files


def _nvcc_fatbin(executable, target: Target) -> bytes:
    import tvm.support.nvcc as nvcc

    sources = [m.inspect_source("") for m in _walk(executable.mod) if m.kind == "cuda"]
    if not sources:
        raise HwcError(f"TVM produced no CUDA kernels for {target.name}")
    try:
        with target.tvm_target():
            return bytes(nvcc.compile_cuda("\n".join(sources), target_format="fatbin", compiler="nvcc"))
    except Exception as exc:  # nvcc errors arrive as RuntimeError with the compiler's output
        raise HwcError(f"nvcc failed to compile the CUDA kernels for {target.name}: "
                       f"{first_line(exc)}") from exc


def _walk(module):
    yield module
    for child in module.imports:
        yield from _walk(child)


def is_gpu(target: Target) -> bool:
    return target.tvm["target"]["kind"] in ("cuda", "rocm", "vulkan", "metal", "opencl")


def check_toolchain(target: Target) -> None:
    """Fail early, in one line, where the target cannot be built on this machine."""
    if target.tvm["target"]["kind"] == "cuda" and shutil.which("nvcc") is None:
        raise HwcError(f"target {target.name} needs the CUDA toolkit (nvcc) to build; none is on PATH. "
                       f"Install CUDA or build on a machine that has it")
    compiler = target.tvm.get("cross_compiler")
    if compiler and shutil.which(compiler) is None:
        raise HwcError(f"target {target.name} needs the cross compiler {compiler!r}, which is not on PATH "
                       f"(Debian: apt-get install g++-aarch64-linux-gnu)")


def run_local(library: Path, feeds: dict[str, np.ndarray], input_names: list[str]):
    """Load an exported library in this process; return the VM, its device and the inputs on it."""
    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    args = [tvm.runtime.tensor(feeds[name], device) for name in input_names]
    return vm, device, args


def outputs_to_numpy(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [r.numpy() for r in result]


# ------------------------------------------------------------------ private
def _open_database(db_dir: Path):
    import tvm.s_tir.meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(db_dir / "database_workload.json"),
                                    path_tuning_record=str(db_dir / "database_tuning_record.json"))


@contextlib.contextmanager
def _named_handlers_only(logger: logging.Logger):
    """MetaSchedule re-configures its logger by handler *name* and crashes on an unnamed one (e.g. a
    log-capturing handler an embedding application attached); detach those meanwhile."""
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)


def _has_record(database, task, tvm_target) -> bool:
    return database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name) is not None


def _progress_callback(progress: Callable[[str], None], total: int):
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.count = 0
            self._last = 0.0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.count += len(measure_candidates)
            if time.monotonic() - self._last > 5 or self.count >= total:
                self._last = time.monotonic()
                progress(f"[{self.count}/{total}] tuning trials")

    return _Progress()
