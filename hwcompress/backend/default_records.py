"""The rule-based default schedule, measured like a tuning candidate and stored as a record.

A kernel built without tuning runs ``default_schedule``; a tuned build applies the best record in
the database instead. With a small budget MetaSchedule's best of a few random candidates can be
slower than the default (a ShuffleNet-style model ran 2.07x ONNX Runtime after a default compile,
1.54x untuned), so the default schedule of each kernel to be tuned is built and timed by the same
builder and runner first and committed as one more record: the database then holds the faster of
the two, MetaSchedule's evolutionary search starts from it, and tuning can only make a kernel faster.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..progress import SILENT, Progress


@dataclass
class DefaultRecord:
    workload: object   # the task's IRModule
    seconds: float     # mean measured time of the default schedule


def commit_default_records(tasks, tvm_target, lanes: int, builder, runner, database,
                           progress: Progress = SILENT) -> list[DefaultRecord]:
    """Build, time and commit the default schedule of every task in ``tasks`` that has none in
    ``database`` yet; the records committed (kernels whose default failed to build or run get none)."""
    import tvm.s_tir.meta_schedule as ms

    from .default_schedule import default_schedule_of, target_cores

    cores = target_cores(tvm_target)  # the target's, not this machine's
    scheduled = []
    for task in tasks:
        workload = task.dispatched[0]
        if database.query_tuning_record(workload, tvm_target, task.task_name) is not None:
            continue
        sch = default_schedule_of(workload, lanes, cores)
        if sch is not None:
            scheduled.append((task, sch))
    if not scheduled:
        return []
    progress(f"tuning: timing the default schedule of {len(scheduled)} kernels (what a tuned kernel must beat)")
    built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for _, sch in scheduled])
    runnable = [(task, sch, result) for (task, sch), result in zip(scheduled, built) if result.error_msg is None]
    inputs = [ms.runner.RunnerInput(result.artifact_path, "cpu",
                                    ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]))
              for _, sch, result in runnable]
    committed = []
    for (task, sch, _), future in zip(runnable, runner.run(inputs)):
        result = future.result()
        if result.error_msg is not None or not result.run_secs:
            continue
        seconds = [float(s) for s in result.run_secs]
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, result.run_secs, tvm_target, ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])))
        committed.append(DefaultRecord(task.dispatched[0], sum(seconds) / len(seconds)))
    return committed


def defaults_kept(records: list[DefaultRecord], database) -> int:
    """How many kernels' best record is still their default schedule (no candidate beat it)."""
    kept = 0
    for record in records:
        best = database.get_top_k(database.commit_workload(record.workload), 1)
        if best and best[0].run_secs and _mean(best[0].run_secs) >= record.seconds:
            kept += 1
    return kept


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
