"""Latency figures, the one measurement interface, and the cache that keeps finished figures.

Every backend (``local``, ``rpc``, the cycle ``model``, or ``not measured``) returns the same
``Latency`` with its own ``method``; a target that cannot be measured gets ``not_measured`` with
the reason, never a host figure in its place. Backends are chosen in one place, ``factory``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..model.fileio import write_text
from ..progress import SILENT, Progress


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


def from_samples(method: str, seconds_per_run: list[float], number: int, threads: int | None,
                 device: str | None = None) -> Latency:
    ms = np.asarray(seconds_per_run) * 1e3
    return Latency(method=method, median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
                   min_ms=float(ms.min()), repeat=len(ms), number=number, threads=threads, device=device)


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


@dataclass
class Job:
    """One thing to time: a library (and the ONNX model it was built from, which is all a cycle model
    needs); ``key`` names the figure in a cache."""

    key: str
    library: Path | None
    feeds: dict[str, np.ndarray]
    input_names: list[str]
    model: onnx.ModelProto | None = field(default=None, repr=False)


@dataclass
class Measurement:
    latency: Latency
    outputs: list[np.ndarray] | None  # the artifact's outputs on the feeds, where it ran
    reason: str | None = None          # why there are no outputs


class Measurer:
    """The interface every backend implements. ``measure`` times one job and returns its outputs
    where it ran; ``measure_all`` times many, keeping each figure in a cache as soon as it exists."""

    method: str = "not measured"
    runs_here = False      # the artifact runs in this process: accuracy can be measured on it
    gives_latency = True   # False: outputs at most (an emulator), or nothing (no device)
    needs_library = True   # False: the figure comes from the ONNX model alone (a cycle model)
    batches = False        # measure_all spreads a batch over several devices: build the batch first

    def identity(self) -> dict[str, Any]:
        """What the figures depend on besides the job (for cache keys)."""
        return {"method": self.method}

    def description(self) -> str:
        return self.method

    def measure(self, job: Job) -> Measurement:
        raise NotImplementedError

    def run_many(self, job: Job, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]] | None:
        """The artifact's outputs for each input where it runs here (accuracy on the artifact); else None."""
        return None

    def kernel_times(self, job: Job) -> dict[str, float]:
        """Milliseconds per fused kernel where the artifact runs here (see ``local.kernel_times``); else empty."""
        return {}

    def baseline(self, job: Job, rounds: int) -> dict | None:
        """ONNX Runtime on ``job.model`` beside the library, where both run here; else None."""
        return None

    def ratio(self, job: Job, reference: Job, rounds: int = 5) -> float | None:
        """``job``'s time over ``reference``'s, timed side by side in alternating rounds where both
        run here (a shared machine's speed drifts by tens of percent between two measurements taken
        minutes apart; the ratio of neighbouring rounds does not); else None."""
        return None

    def measure_all(self, jobs: list[Job], cache: MeasurementCache, progress: Progress = SILENT) -> dict[str, Latency]:
        results = {}
        for job in jobs:
            latency = cache.get(job.key)
            if latency is None:
                latency = self.measure(job).latency
                cache.put(job.key, latency)
            results[job.key] = latency
        return results


class NotMeasurable(Measurer):
    """A target whose artifact cannot run here and that has no device or model: says why."""

    gives_latency = False

    def __init__(self, reason: str, why_no_outputs: str):
        self.reason, self.why_no_outputs = reason, why_no_outputs

    def measure(self, job: Job) -> Measurement:
        return Measurement(not_measured(self.reason), None, self.why_no_outputs)
