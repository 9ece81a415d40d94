"""Latency measurement: one interface, with backends that say how a figure was obtained.

``LocalMeasurer`` times an exported library in this process with TVM's ``time_evaluator``. Later
backends (RPC devices, the cycle model of a device-less target) return the same ``Latency`` with
their own ``method``; a target that cannot be measured gets ``not_measured`` with the reason, never
a host figure in its place.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .fileio import write_text


@dataclass
class Latency:
    method: str                     # "local", "rpc", "model" or "not measured"
    median_ms: float | None = None
    p90_ms: float | None = None
    min_ms: float | None = None
    repeat: int = 0
    number: int = 0
    threads: int | None = None
    device: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.median_ms is None:
            return f"not measured ({self.reason})"
        if self.method == "model":
            return f"{self.median_ms:.3f} ms modelled by {self.device}"
        return (f"{self.median_ms:.3f} ms median, p90 {self.p90_ms:.3f}, min {self.min_ms:.3f} "
                f"({self.method}, {self.repeat}x{self.number} runs, {self.threads} threads)")


def not_measured(reason: str) -> Latency:
    return Latency(method="not measured", reason=reason)


class MeasurementCache:
    """Finished measurements, one JSON file, rewritten atomically after each new figure."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> Latency | None:
        entry = self.entries.get(key)
        return Latency(**entry) if entry else None

    def put(self, key: str, latency: Latency) -> None:
        with self._lock:
            self.entries[key] = latency.to_dict()
            write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True))


class Measurer(Protocol):
    def measure(self, library: Path, feeds: dict[str, np.ndarray], input_names: list[str]) -> tuple[Latency, list[np.ndarray]]:
        """Time the library on these inputs and return its outputs for a correctness check."""


def from_samples(method: str, seconds_per_run: list[float], number: int, threads: int | None,
                 device: str | None = None) -> Latency:
    ms = np.asarray(seconds_per_run) * 1e3
    return Latency(method=method, median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
                   min_ms=float(ms.min()), repeat=len(ms), number=number, threads=threads, device=device)


class LocalMeasurer:
    """Times a library on this machine's CPU: warm-up, then ``repeat`` samples of ``number`` runs."""

    def __init__(self, threads: int, repeat: int = 30, min_repeat_ms: int = 100):
        self.threads = threads
        self.repeat = repeat
        self.min_repeat_ms = min_repeat_ms

    def measure(self, library, feeds, input_names):
        from .tvm_build import outputs_to_numpy, run_local

        with _tvm_threads(self.threads):
            vm, device, args = run_local(library, feeds, input_names)
            outputs = outputs_to_numpy(vm["main"](*args))
            timer = vm.time_evaluator("main", device, number=1, repeat=self.repeat,
                                      min_repeat_ms=self.min_repeat_ms, cooldown_interval_ms=0)
            timer(*args)  # warm-up: caches, thread pool, page faults
            result = timer(*args)
        return from_samples("local", list(result.results), number=1, threads=self.threads, device="host cpu"), outputs


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


def kernel_times(library, feeds, input_names, runs: int = 5) -> dict[str, float]:
    """Median milliseconds per TVM kernel (fused layer) of one run, from the VM's instrument hook.

    Each figure includes a return to Python between kernels, which leaves caches and worker
    threads colder than in an uninstrumented run: a conv measured 0.50 ms here ran 0.26 ms back to
    back. Compare these figures with each other (baseline vs candidate), not with a latency."""
    import time as _time

    from tvm.relax import VMInstrumentReturnKind

    from .tvm_build import run_local

    vm, _, args = run_local(library, feeds, input_names)
    vm["main"](*args)
    samples: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def hook(func, name, before_run, ret_value, *rest):
        if before_run:
            started[name] = _time.perf_counter()
        else:
            samples.setdefault(name, []).append((_time.perf_counter() - started.pop(name)) * 1e3)
        return VMInstrumentReturnKind.NO_OP

    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](*args)
    return {name: float(np.median(v)) * (len(v) // runs or 1) for name, v in samples.items()}
