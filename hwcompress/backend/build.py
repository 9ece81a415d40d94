"""The one build sequence: ONNX -> Relax -> (int8 lowering) -> kernels -> (tuning) -> library.

``build_model`` is what ``hwc compile``, the latency table and the search's evaluator all call.
``lower`` makes the fused kernels once; ``tune`` and ``build`` both take them. On CPU targets
convolutions run in NHWC with the project's register-blocked schedule (``cpu_schedules``, dense and
depthwise); the other kernels are tuned with MetaSchedule (``tune``). GPU targets get dlight's
rule-based schedules (no tuning; building needs no GPU), CUDA kernels compiled by nvcc into the
library (``cuda_kernels``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import onnx

from ..config.host import last_level_cache_bytes
from ..config.targets import Target
from ..config.vector_unit import VectorUnit
from ..errors import HwcError, first_line
from ..progress import SILENT, Progress
from .export import export
from .importer import import_onnx
from .lowering_rules import install_lowering_rules
from ..config.cache import default_cache_dir
from .tune import TuningResult, UntunedProfile, tune, tuning_db_dir
from .tuning_db import RECORDS, records, repair

if TYPE_CHECKING:  # the lowering imports TVM, which a build loads only when it runs
    from .int8_lowering import Int8Lowering

DEFAULT_TUNE_TRIALS = 500
DEFAULT_TUNE_SECONDS = 600.0  # a default compile ends in bounded time; 0: no limit
NEGLIGIBLE_SHARE = 0.01  # of the untuned model's per-kernel profile: a kernel under that is left untuned


@dataclass
class BuildOptions:
    tune_trials: int = DEFAULT_TUNE_TRIALS
    tune_seconds: float = DEFAULT_TUNE_SECONDS  # wall-time budget of the tuning (0: none)
    cache_dir: Path | None = None
    device: str | None = None  # rpc://HOST:PORT/KEY where tuning candidates run; default the target's
    int8_compute: bool = True  # QDQ Conv/MatMul as integer compute in TVM (int8_lowering)
    # (library, model) -> (latency ms, kernel name -> ms) where the model runs here: the untuned
    # model's profile, which decides what is too small to tune (the compile gives its measurer's).
    profiler: Callable[[Path, onnx.ModelProto], tuple[float | None, dict[str, float]]] | None = field(
        default=None, repr=False, compare=False)
    winograd: bool = True      # float 3x3 stride-1 convs by Winograd F(2x2 or 4x4, 3x3) on CPUs (winograd)

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


@dataclass
class Artifact:
    """A built model: the library on disk and what the build did."""

    target: Target
    model: onnx.ModelProto           # the ONNX model it was built from
    library: Path
    files: dict[str, str]            # file name -> note, in the library's directory
    input_names: list[str]
    build_seconds: float
    tuning: TuningResult | None = None
    tuning_note: str | None = None
    int8: Int8Lowering | None = None
    kernels: dict[str, dict] | None = None  # kernel name -> op, shapes, fused ops (kernel_info)


def build_model(model: onnx.ModelProto, target: Target, options: BuildOptions, directory: Path,
                name: str = "model.so", progress: Progress = SILENT) -> Artifact:
    """Import, lower (int8 QDQ to integer compute unless turned off), tune what has no schedule
    where the target can be tuned from here, build with the tuning records, export to ``directory``."""
    check_toolchain(target)
    if options.tune_trials < 0:
        raise HwcError("--tune-trials must be 0 or more")
    if options.tune_seconds < 0:
        raise HwcError("--tune-seconds must be 0 (no limit) or more")
    progress("importing into TVM Relax")
    mod = import_onnx(model, None if target.is_gpu else VectorUnit.of(target.tvm_target()))
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        from .float16_accumulate import accumulate_in_float32

        mod = accumulate_in_float32(mod)
    int8 = None
    if options.int8_compute and any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        from .int8_conv_schedule import dot_product_activations, dot_product_instructions
        from .int8_lowering import lower_qdq

        mod, int8 = lower_qdq(mod, dot_product_activations(target.tvm_target()))
        int8.instructions = dot_product_instructions(target.tvm_target())
        progress(f"int8 lowering: {len(int8.lowered)} QDQ layer(s) run as int8 x int8 -> int32"
                 + (f", {len(int8.kept_float)} kept in float" if int8.kept_float else ""))
    progress(f"lowering for {target.name}")
    kernels = lower(mod, target, winograd=options.winograd)
    from .kernel_info import describe_kernels

    described = describe_kernels(kernels)
    db_dir, tuning, note = _tune_where_possible(kernels, model, target, options, progress)
    progress(f"building for {target.name}")
    start = time.monotonic()
    executable = build(kernels, target, db_dir)
    seconds = time.monotonic() - start
    progress(f"exporting {name}")
    Path(directory).mkdir(parents=True, exist_ok=True)
    files = export(executable, target, Path(directory), name)
    return Artifact(target, model, Path(directory) / name, files, [v.name for v in model.graph.input], seconds,
                    tuning, note, int8, described)


def _tune_where_possible(kernels, model: onnx.ModelProto, target: Target, options: BuildOptions,
                         progress: Progress):
    """(database, tuning result, note): GPUs and device-less targets are not tuned; a cross target
    only on its device; ``tune_trials`` 0 uses the records already there. Kernels under 1% of the
    model's time are left untuned, judged by the untuned model's profile (``options.profiler``,
    where the model runs here)."""
    if target.is_gpu:
        return None, None, "GPU target: dlight rule-based schedules, no tuning"
    if target.latency.method == "model":
        return None, None, f"{target.name} has no device: a functional reference build, not tuned"
    db_dir = tuning_db_dir(options.cache, target)
    repair(db_dir, progress.warn)
    device = options.device or target.latency.device
    if options.tune_trials > 0 and (device or not target.is_cross):
        # Tuned on a device: no profile of the model there before tuning, every kernel is tuned.
        profile = None if device or options.profiler is None else (
            lambda: _untuned_profile(kernels, model, target, db_dir, options.profiler, progress.at("tune")))
        return db_dir, tune(kernels, target, options.tune_trials, db_dir, progress.at("tune"), device,
                            options.tune_seconds or None, profile, NEGLIGIBLE_SHARE), None
    if options.tune_trials > 0:
        note = (f"{target.name} code cannot run here, so it is tuned only on its device "
                f"(--device rpc://HOST:PORT/KEY); records already in {db_dir} are used")
        progress(note)
        return db_dir, None, note
    return db_dir, None, f"--tune-trials 0: no tuning; records already in {db_dir} are used"


def _untuned_profile(kernels, model: onnx.ModelProto, target: Target, db_dir: Path, profiler,
                     progress: Progress) -> UntunedProfile | None:
    """The model before this tuning (the records already in ``db_dir``, default schedules
    elsewhere), built and profiled by ``profiler``: which kernels are too small a share of it to be
    worth tuning. Judged inside the model, not alone: a ShuffleNet-style model's layout transposes
    ran their default schedule in 5-20 microseconds alone (under 1% of the model), yet left untuned
    the model ran 2-8% slower than with them tuned (in alternating rounds)."""
    progress("tuning: profiling the model untuned first (which kernels are worth tuning)")
    try:
        with tempfile.TemporaryDirectory(prefix="hwc-untuned-") as scratch:
            library = Path(scratch) / "untuned.so"
            export(build(kernels, target, db_dir), target, Path(scratch), library.name)
            latency, times = profiler(library, model)
    except (HwcError, OSError) as exc:
        progress.warn(f"tuning: the untuned model could not be profiled ({first_line(str(exc))}); every kernel is tuned")
        return None
    if latency is None or not times:
        return None
    total = sum(times.values()) or 1.0
    progress(f"tuning: the model runs {latency:.3f} ms untuned")
    return UntunedProfile(latency, {name: ms / total for name, ms in times.items()})


def lower(mod, target: Target, winograd: bool = True):
    """The fused kernels of ``mod`` for ``target``, done once and shared by ``tune`` and ``build``
    (so that the database's records match the kernels that are built): on CPUs ``cpu_kernels``,
    on GPUs dlight's rule-based schedules."""
    import tvm
    from tvm import relax

    tvm_target = target.tvm_target()
    install_lowering_rules()
    with _as_build_error(target), tvm_target, tvm.transform.PassContext(opt_level=3):
        if not target.is_gpu:
            local = target.latency.method == "local" and not target.is_cross
            return cpu_kernels(mod, tvm_target, winograd, last_level_cache_bytes() if local else None)
        import tvm.s_tir.dlight as dl

        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(relax.get_pipeline("zero")(mod))


def cpu_kernels(mod, tvm_target, winograd: bool = True, cache_bytes: int | None = None):
    """The fused kernels of ``mod`` for a CPU: convolutions in NHWC and register-blocked by
    ``cpu_schedules`` (3x3 ones by ``winograd`` where it pays, unless turned off; ``cache_bytes``:
    the CPU's last-level cache where it is this machine's; a depthwise conv and the 1x1 conv
    reading it as one kernel, ``depthwise_pointwise``), their weights repacked at compile time,
    concats written in place by the kernels making their inputs (``concat_in_place``), the rest
    left for MetaSchedule."""
    import tvm
    from tvm import relax

    from .batch_matmul import rewrite_batch_matmuls
    from .channel_padding import pad_output_channels, pad_output_width
    from .concat_in_place import concat_in_place
    from .dense_as_conv import dense_as_conv
    from .conv_schedules import schedule_convolutions
    from .cpu_schedules import VectorUnit, nhwc_layout
    from .depthwise_pointwise import fuse_depthwise_pointwise
    from .layer_norms import fold_layer_norms
    from .padded_rows import carry_padded_rows
    from .small_powers import multiply_small_powers
    from .row_kernels import rewrite_row_kernels
    from .winograd import rewrite_winograd_convs

    unit = VectorUnit.of(tvm_target)
    canonical = fold_layer_norms(multiply_small_powers(mod))
    dense = carry_padded_rows(dense_as_conv(rewrite_batch_matmuls(canonical, unit), unit))
    convs = rewrite_row_kernels(nhwc_layout(dense), unit.lanes)
    if winograd:  # before the channel padding: its slice would be an epilogue wider than the tile
        convs = rewrite_winograd_convs(convs, unit, cache_bytes)
    lowered = relax.get_pipeline("zero")(pad_output_width(pad_output_channels(convs, unit.lanes), unit))
    with tvm_target:
        scheduled = schedule_convolutions(fuse_depthwise_pointwise(lowered, tvm_target), tvm_target)
    # The convs' weight repacking becomes functions of the constant weights, run at compile time,
    # once per weight (an unrolled LSTM calls one conv with the same weights at every step: 320
    # identical repackings, each compiled and run, took 7 s).
    prepack = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                        relax.transform.EliminateCommonSubexpr(), relax.transform.FoldConstant(),
                                        relax.transform.DeadCodeElimination()])
    return concat_in_place(prepack(scheduled))


def build(kernels, target: Target, db_dir: Path | None):
    """Compile ``kernels`` (from ``lower``), on CPUs with the tuned records in ``db_dir`` and the
    default schedule for the kernels that have none."""
    import tvm
    from tvm import relax

    from .cpu_schedules import VectorUnit
    from .default_schedule import schedule_untuned
    from .stack_buffers import PIPELINE as CPU_PIPELINE

    tvm_target = target.tvm_target()
    install_lowering_rules()
    with _as_build_error(target), tvm_target, tvm.transform.PassContext(opt_level=3):
        if target.kind == "cuda":
            from .cuda_kernels import kernels_compiled_by_nvcc

            with kernels_compiled_by_nvcc(tvm_target):
                return tvm.compile(kernels, target=tvm_target)
        if not target.is_gpu:
            if db_dir is not None and (db_dir / RECORDS).exists():
                with records(db_dir):  # the pass reads the database in scope
                    kernels = relax.transform.MetaScheduleApplyDatabase()(kernels)
            kernels = schedule_untuned(kernels, VectorUnit.of(tvm_target).lanes)
            return tvm.compile(kernels, target=tvm_target, tir_pipeline=CPU_PIPELINE)
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


def check_toolchain(target: Target) -> None:
    """Fail early, in one line, where the target cannot be built on this machine."""
    if target.kind == "cuda" and shutil.which("nvcc") is None:
        raise HwcError(f"target {target.name} needs the CUDA toolkit (nvcc) to build; none is on PATH. "
                       f"Install CUDA or build on a machine that has it")
    if target.is_gpu:
        target.tvm_target_dict()  # a GPU taken from this machine (arch: auto) must be here
    if target.cross_compiler and shutil.which(target.cross_compiler) is None:
        raise HwcError(f"target {target.name} needs the cross compiler {target.cross_compiler!r}, which is not on "
                       f"PATH (Debian: apt-get install g++-aarch64-linux-gnu)")
