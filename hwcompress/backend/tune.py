"""MetaSchedule tuning of the kernels the project's own schedules leave, into a persistent database.

One database per target, TVM version, kernel form and thread count under the cache directory.
MetaSchedule keys records by the structural hash of each fused kernel, so a later compile of the
same model, or of another model with the same layer shapes, reuses them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config.device import parse_device
from ..config.targets import Target
from ..errors import HwcError, first_line
from ..progress import SILENT, Progress
from .export import export_library
from .tuning_db import mark_tuned, open_database, records, repair, tuned_tasks

# Bumped when the kernels handed to MetaSchedule change form (layout, hand schedules, thread
# count of the runner), so that records tuned for the old form are not mixed with new ones.
KERNEL_FORM = "nhwc-blocked-conv-2"  # 2: kernel buffers on the stack (stack_buffers): old timings do not hold


def tuning_db_dir(cache_dir: Path, target: Target) -> Path:
    """One MetaSchedule database per (TVM version, resolved target, kernel form, runner threads)."""
    import tvm

    key = json.dumps({"tvm": tvm.__version__, "target": target.tvm_target_dict(), "kernels": KERNEL_FORM,
                      "threads": os.environ.get("TVM_NUM_THREADS")}, sort_keys=True)
    return Path(cache_dir) / "tuning" / f"{target.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# One candidate's build: a kernel builds in 1-3 s; a sampled schedule that makes LLVM run for minutes
# (one of SqueezeNet's int8 max-pool kernels, 16 candidates: 5 minutes at the 300 s this was, the
# whole tuning run waiting on it) would be no faster to run. It counts as a failed candidate.
BUILD_TIMEOUT_S = 30


def ms_build(mod, target, _params):
    """MetaSchedule builder that skips ``import tvm.s_tir.tensor_intrin``.

    The default builder imports it in every worker (~35 s here) and then hits its own timeout;
    this project's CPU schedules use no tensor intrinsics.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .lowering_rules import install_lowering_rules
    from .stack_buffers import PIPELINE

    install_lowering_rules()  # candidates are built as the final model will be

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target, pipeline=PIPELINE)


def ms_export(compiler: str | None, scratch: str, module) -> str:
    """MetaSchedule export through the one export (cross-linked for cross targets), into the tuning
    run's scratch folder, which the run removes (each candidate's library, left in /tmp, had filled
    it with thousands of folders)."""
    path = os.path.join(tempfile.mkdtemp(prefix="hwc-ms-", dir=scratch), "kernel.so")
    return str(export_library(module, path, compiler))


@dataclass
class TuningResult:
    tasks: int
    trials_requested: int
    trials_run: int
    records_reused: int
    seconds: float
    database: str
    defaults_kept: int = 0  # kernels where no candidate beat the default schedule (measured alike)
    negligible: int = 0  # kernels left on their default schedule: too fast for tuning to pay
    stopped: str | None = None  # why tuning ended before its trials (the time budget), if it did
    model_ms: float | None = None  # the model's latency before tuning, where it was timed (None: not)


@dataclass
class UntunedProfile:
    """The model as it runs before tuning: its latency, and each kernel's share of its time (a
    per-kernel profile of the model, so a kernel is judged by what it costs inside it)."""

    latency_ms: float
    shares: dict[str, float]  # kernel name -> share of the profile's total


def tune(kernels, target: Target, trials: int, db_dir: Path, progress: Progress = SILENT,
         device: str | None = None, seconds: float | None = None, profile=None,
         negligible_share: float = 0.0) -> TuningResult:
    """Tune every fused kernel of ``kernels`` (from ``build.lower``) that has no schedule yet with
    MetaSchedule, adding to ``db_dir``.

    Candidates run on this machine, or on ``device`` (rpc://HOST:PORT/KEY) through TVM's
    RPCRunner; a cross target is only tuned on its device. Tuning runs in a child process of its
    own process group: Ctrl-C reaches only hwc, which stops the child (native code cannot be
    interrupted safely), keeps the records written so far, and raises KeyboardInterrupt; the next
    run tunes again what had not finished. ``seconds`` bounds the wall time the same way: when it
    is spent the child is stopped, the records so far are kept and the build goes on with them.
    Kernels that take under ``negligible_share`` of the model's time (``profile()``: an
    ``UntunedProfile``, asked only when there is something to tune; None: unknown) keep their
    default schedule untuned."""
    import tvm

    if "num-cores" not in target.tvm_target_dict():
        raise HwcError(f"target {target.name} cannot be tuned: its TVM target has no num-cores "
                       f"(add num-cores: auto to {target.source})")
    db_dir.mkdir(parents=True, exist_ok=True)  # build_model has repaired the database already
    start = time.monotonic()
    tasks, known, tunable = _tasks(kernels, target, db_dir)
    if not tunable or trials <= 0:
        progress(f"tuning: {len(tasks)} kernels, {len(known)} already in the database, nothing to tune")
        return TuningResult(tasks=len(tasks), trials_requested=trials, trials_run=0, records_reused=len(known),
                            seconds=time.monotonic() - start, database=str(db_dir))
    untuned = profile() if profile is not None and negligible_share > 0 else None
    model_ms = untuned.latency_ms if untuned else None
    negligible = sorted(name for name, share in untuned.shares.items() if share < negligible_share) if untuned else []
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    scratch = tempfile.mkdtemp(prefix="hwc-tune-")
    child = context.Process(target=_tune_in_child, args=(tvm.ir.save_json(kernels), target, trials, str(db_dir),
                                                         device, events, negligible, scratch), daemon=True)
    child.start()
    heartbeat = _Heartbeat(progress)
    try:
        while True:
            if seconds and time.monotonic() - start > seconds:
                _stop_at_budget(child, db_dir)
                run = heartbeat.done or 0
                stopped = (f"time budget of {seconds:g} s spent after {run} trials (--tune-seconds); the "
                           f"records so far are used, a later compile goes on tuning")
                progress.warn(f"tuning: {stopped}")
                return TuningResult(tasks=len(tasks), trials_requested=trials, trials_run=run,
                                    records_reused=len(known), seconds=time.monotonic() - start,
                                    database=str(db_dir), stopped=stopped, model_ms=model_ms)
            try:
                kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                if not child.is_alive():
                    raise HwcError(f"tuning stopped unexpectedly (exit code {child.exitcode}); the records "
                                   f"written so far are kept in {db_dir}")
                heartbeat.beat()
                continue
            if kind == "event":
                heartbeat.saw(*payload)
                progress(*payload)
            elif kind == "warning":
                progress.warn(payload)
            elif kind == "error":
                raise HwcError(payload)
            else:
                result = TuningResult(**payload | {"model_ms": model_ms})
                break
        child.join()
    except BaseException:
        _stop(child)
        raise
    finally:  # the child has ended (or was stopped) on every way out
        shutil.rmtree(scratch, ignore_errors=True)
    repair(db_dir, progress.warn)  # failed candidates of this run never become records
    return result


def _stop_at_budget(child, db_dir: Path) -> None:
    """End tuning at its time budget: the records written so far stay (a line torn by the stop is
    dropped silently: this stop is expected), kernels not finished are tuned again by a later run."""
    _stop(child)
    repair(db_dir, lambda _message: None)


class _Heartbeat:
    """A line every few seconds while MetaSchedule is silent: its first measurement of a kernel
    comes only after it has searched and compiled a whole batch of candidates (minutes on 2 cores),
    and a user must see that tuning is alive, what it is at and for how long."""

    EVERY_S = 5.0

    def __init__(self, progress: Progress):
        self.progress, self.start, self.last = progress, time.monotonic(), time.monotonic()
        self.done, self.total = None, None

    def saw(self, message: str, done: int | None = None, total: int | None = None) -> None:
        self.last = time.monotonic()
        if total is not None:
            self.done, self.total = done, total

    def beat(self) -> None:
        now = time.monotonic()
        if now - self.last < self.EVERY_S:
            return
        self.last = now
        what = ("searching and compiling the first candidates" if not self.done
                else "searching, compiling and measuring the next candidates")
        self.progress(f"tuning: {what} ({now - self.start:.0f} s)", done=self.done, total=self.total)


def _stop(child) -> None:
    """End the child and its MetaSchedule workers (its whole process group). The workers are
    killed too when the child ended at the polite signal, and waited for (up to 2 s): one still
    exporting a candidate had written into the scratch folder after it was removed."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            child.kill() if child.is_alive() else None
        child.join(wait)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.killpg(child.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _tune_in_child(kernels_json: str, target: Target, trials: int, db_dir: str, device: str | None, events,
                   negligible: list[str], scratch: str) -> None:
    os.setsid()  # out of the terminal's process group: Ctrl-C goes to hwc, which stops this group
    _skip_tensor_intrinsic_library(arm=str(target.tvm_target_dict().get("mtriple", "")).startswith("aarch64"))
    import tvm

    progress = Progress(lambda e: events.put(("warning", e.message) if e.warning else
                                             ("event", (e.message, e.done, e.total))))
    try:
        result = _tune_here(tvm.ir.load_json(kernels_json), target, trials, Path(db_dir), progress, device,
                            negligible, scratch)
        events.put(("result", result.__dict__))
    except HwcError as exc:
        events.put(("error", str(exc)))
    except Exception as exc:  # MetaSchedule raises TVM errors of many types
        events.put(("error", f"tuning failed: {type(exc).__name__}: {first_line(exc)}"))


def _skip_tensor_intrinsic_library(arm: bool) -> None:
    """MetaSchedule's ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, which parses every
    target's tensor intrinsics from TVMScript: 25-40 s on 2 cores (CUDA's alone 30 s under a
    profiler), paid by every tuning run, most of a small model's. The CPU rules used here
    (``llvm``) need only the CPU ones, so the package is registered as imported without running its
    ``__init__`` and only the target's CPU family's intrinsics (``x86`` or ``arm_cpu``) are loaded."""
    import importlib.util
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    # What MetaSchedule's CPU rules look up (VNNI, NEON dot products): 0.2 s (x86), 0.8 s (Arm).
    importlib.import_module(f"{name}.{'arm_cpu' if arm else 'x86'}")


def _tune_here(kernels, target: Target, trials: int, db_dir: Path, progress: Progress,
               device: str | None, negligible_names: list[str], scratch: str) -> TuningResult:
    import tvm.s_tir.meta_schedule as ms

    from .cpu_schedules import VectorUnit
    from .default_records import commit_default_records, defaults_kept

    start = time.monotonic()
    tasks, known, tunable = _tasks(kernels, target, db_dir)
    database = open_database(db_dir)
    progress(f"tuning: {len(tasks)} kernels, {len(known)} already in the database, "
             f"{len(tunable)} to tune with up to {trials} trials")
    run, kept, negligible = 0, 0, []
    if tunable and trials > 0:
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        builder = ms.builder.LocalBuilder(
            f_build=ms_build, f_export=functools.partial(ms_export, target.cross_compiler, scratch),
            timeout_sec=BUILD_TIMEOUT_S, max_workers=min(os.cpu_count() or 1, 4))
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
        if device:
            remote = parse_device(device)
            runner = ms.runner.RPCRunner(ms.runner.RPCConfig(remote.host, remote.port, remote.key,
                                                             session_timeout_sec=120), evaluator_config=evaluator)
        else:
            runner = ms.runner.LocalRunner(evaluator_config=evaluator)
        with contextlib.redirect_stdout(sys.stderr), _named_handlers_only(logging.getLogger("tvm.s_tir.meta_schedule")):
            defaults = commit_default_records(tunable, target.tvm_target(), VectorUnit.of(target.tvm_target()).lanes,
                                              builder, runner, database, progress)
            negligible = _negligible(tunable, negligible_names, progress)
            tunable = [t for t in tunable if t not in negligible]
            # Every kernel gets an equal share: a budget spent on a few kernels leaves the rest naive.
            per_task = max(1, -(-trials // max(1, len(tunable))))
            callback = _progress_callback(progress, per_task * len(tunable), [t.task_name for t in tunable], per_task)
            if tunable:
                contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    tunable, str(db_dir), strategy=_search_strategy(per_task))
                ms.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(db_dir),
                    max_trials_global=per_task * len(tunable),
                    # Batches of 16, not 32: a kernel's first measurement (and line) comes twice as soon.
                    max_trials_per_task=per_task, num_trials_per_iter=min(per_task, 16),
                    builder=builder, runner=runner, database=database, cost_model=ms.cost_model.XGBModel(),
                    measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [callback],
                )
        # Kernels left on their default for being negligible had no candidates: not counted as kept.
        tuned_defaults = [d for d in defaults if not any(d.workload.same_as(t.dispatched[0]) for t in negligible)]
        run, kept = callback.count, defaults_kept(tuned_defaults, database)
        if tunable:  # the last count, even if short of the total
            progress("tuning trials", done=run, total=per_task * len(tunable))
        mark_tuned(db_dir, {task_key(t) for t in tunable + negligible})
    return TuningResult(tasks=len(tasks), trials_requested=trials, trials_run=run, records_reused=len(known),
                        seconds=time.monotonic() - start, database=str(db_dir), defaults_kept=kept,
                        negligible=len(negligible))


def _search_strategy(per_task: int):
    """MetaSchedule's evolutionary search sized for tens of trials per kernel, not thousands.

    Its defaults (a population of 512, and each round at least 50 candidates not measured yet,
    retried 5 times) stall on kernels with small design spaces: a ShuffleNet-style model's layout
    transposes and concats have a few dozen distinct schedules, and the default compile ran 66-93
    trials in 400-500 s, most of it generating candidates it had already measured."""
    import tvm.s_tir.meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=min(16, per_task),
                                                 max_fail_count=2)


def _negligible(tasks: list, names, progress: Progress) -> list:
    """The tasks named in ``names`` (kernels under 1% of the model's time in its untuned profile):
    tuning could save less than that each (MobileNetV2's 4 untuned kernels run 2 microseconds
    each, and tuning them took 4 minutes of a 9-minute compile). Their default schedule stays."""
    names = set(names)
    chosen = [t for t in tasks if t.task_name in names]
    if chosen:
        progress(f"tuning: {len(chosen)} kernel(s) keep their default schedule untuned: each takes under 1% of the "
                 f"model's time, less than tuning could save")
    return chosen


# Kernels reading or writing more tensors than this keep the default schedule: the concatenation
# of an unrolled LSTM's 80 steps (164 tensors) got no first candidate from MetaSchedule's search
# in 570 s, and the whole tuning budget went by with no trial.
MAX_TUNED_TENSORS = 32


def _tasks(kernels, target: Target, db_dir: Path) -> tuple[list, list, list]:
    """The kernels MetaSchedule schedules (not the hand-scheduled ones, nor those of more than
    ``MAX_TUNED_TENSORS`` tensors): all, those whose tuning finished in an earlier run, and the rest."""
    import tvm.s_tir.meta_schedule as ms

    from .cpu_schedules import is_scheduled

    tvm_target = target.tvm_target()
    tasks = [task for task in ms.relax_integration.extract_tasks(kernels, tvm_target)
             if not is_scheduled(task.dispatched[0]["main"])
             and len(task.dispatched[0]["main"].params) <= MAX_TUNED_TENSORS]
    database = records(db_dir)
    finished = tuned_tasks(db_dir)
    known = [t for t in tasks if has_record(database, t, tvm_target) and task_key(t) in finished]
    return tasks, known, [t for t in tasks if t not in known]


def task_key(task) -> str:
    """A kernel's identity across processes: its name and the structural hash of its function."""
    from tvm_ffi import structural_hash

    return f"{task.task_name}:{structural_hash(task.dispatched[0])}"


def has_record(database, task, tvm_target) -> bool:
    return database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name) is not None


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


def _progress_callback(progress: Progress, total: int, task_names: list[str], per_task: int):
    """A line per measured batch (at most every 5 s): trials done, kernels finished, and the kernel
    just measured with its best time so far."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.count = 0
            self._last = 0.0
            self.trials: dict[int, int] = {}
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.count += len(measure_candidates)
            self.trials[task_id] = self.trials.get(task_id, 0) + len(measure_candidates)
            times = [float(sum(r.run_secs) / len(r.run_secs)) for r in runner_results
                     if r.error_msg is None and r.run_secs]
            if times:
                self.best[task_id] = min(self.best.get(task_id, float("inf")), min(times))
            if time.monotonic() - self._last > 5 or self.count >= total:
                self._last = time.monotonic()
                finished = sum(1 for n in self.trials.values() if n >= per_task)
                best = self.best.get(task_id)
                name = task_names[task_id] if task_id < len(task_names) else f"kernel {task_id}"
                progress(f"tuning trials ({finished}/{len(task_names)} kernels done; {name}: "
                         + (f"best {best * 1e3:.3g} ms)" if best is not None else "no valid candidate yet)"),
                         done=self.count, total=total)

    return _Progress()
