"""Timing on this machine's CPU with TVM's ``time_evaluator``, in this process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..backend.runtime import load_local, outputs_to_numpy, run_outputs
from .latency import Job, Measurement, Measurer, from_samples


class LocalMeasurer(Measurer):
    """Warm-up, then ``repeat`` samples of ``number`` runs, on ``threads`` threads."""

    method = "local"
    runs_here = True

    def __init__(self, threads: int, repeat: int = 30, min_repeat_ms: int = 100):
        self.threads = threads
        self.repeat = repeat
        self.min_repeat_ms = min_repeat_ms

    def identity(self):
        return {"method": self.method, "threads": self.threads}

    def description(self) -> str:
        return f"on this machine ({self.threads} threads)"

    def measure(self, job: Job) -> Measurement:
        with _tvm_threads(self.threads):
            vm, device, args = load_local(job.library, job.feeds, job.input_names)
            outputs = outputs_to_numpy(vm["main"](*args))
            timer = vm.time_evaluator("main", device, number=1, repeat=self.repeat,
                                      min_repeat_ms=self.min_repeat_ms, cooldown_interval_ms=0)
            timer(*args)  # warm-up: caches, thread pool, page faults
            result = timer(*args)
        latency = from_samples("local", list(result.results), number=1, threads=self.threads, device="host cpu")
        return Measurement(latency, outputs)

    def run_many(self, job: Job, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return run_outputs(job.library, inputs, job.input_names)

    def kernel_times(self, job: Job) -> dict[str, float]:
        return kernel_times(job.library, job.feeds, job.input_names)


class _tvm_threads:
    """Pin TVM's thread pool size for a measurement (TVM_NUM_THREADS is read when the pool starts)."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        import tvm

        configure = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        if configure is not None:
            configure(1, self.threads)  # 1 = big cores; n threads
        return self

    def __exit__(self, *exc):
        return False


def kernel_times(library: Path, feeds: dict[str, np.ndarray], input_names: list[str], runs: int = 5) -> dict[str, float]:
    """Median milliseconds per TVM kernel (fused layer) of one run, from the VM's instrument hook.

    Each figure includes a return to Python between kernels, which leaves caches and worker
    threads colder than in an uninstrumented run: a conv measured 0.50 ms here ran 0.26 ms back to
    back. Compare these figures with each other (baseline vs candidate), not with a latency."""
    from tvm.relax import VMInstrumentReturnKind

    vm, _, args = load_local(library, feeds, input_names)
    vm["main"](*args)
    samples: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def hook(func, name, before_run, ret_value, *rest):
        if before_run:
            started[name] = time.perf_counter()
        else:
            samples.setdefault(name, []).append((time.perf_counter() - started.pop(name)) * 1e3)
        return VMInstrumentReturnKind.NO_OP

    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](*args)
    return {name: float(np.median(v)) * (len(v) // runs or 1) for name, v in samples.items()}
