"""Outputs of a cross-built artifact from an emulator, with latency left unmeasured.

Where a target's device is not at hand but its code can be emulated here (aarch64 under
qemu-aarch64, ``backend.emulator``), the compiled artifact's outputs are still checked against
ONNX Runtime; its latency is reported as not measured, never as the emulator's time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backend.emulator import QEMU, ensure_runtime, run_emulated
from ..config.targets import Target
from ..errors import HwcError
from .latency import Job, Measurement, Measurer, not_measured


class EmulatedMeasurer(Measurer):
    method = "not measured"
    gives_latency = False

    def __init__(self, target: Target, no_latency_reason: str, cache_dir: Path | None = None):
        self.target, self.no_latency_reason, self.cache_dir = target, no_latency_reason, cache_dir

    def description(self) -> str:
        return f"outputs under {QEMU} user emulation (latency needs the device)"

    def measure(self, job: Job) -> Measurement:
        latency = not_measured(self.no_latency_reason)
        try:
            runtime = ensure_runtime(self.target.cross_compiler, self.cache_dir)
        except HwcError as exc:  # no runtime to emulate with (offline): the build stands, unchecked
            return Measurement(latency, None, f"the artifact could not be emulated here: {exc}")
        latency.device = f"{QEMU} user emulation"
        return Measurement(latency, run_emulated(job.library, job.feeds, job.input_names, runtime))

    def run_many(self, job: Job, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        runtime = ensure_runtime(self.target.cross_compiler, self.cache_dir)
        return [run_emulated(job.library, feed, job.input_names, runtime) for feed in inputs]

    def measure_all(self, jobs: list[Job], cache, progress=None) -> dict:
        """Latency tables and searches want figures, which an emulator cannot give: none, at no cost."""
        return {job.key: not_measured(self.no_latency_reason) for job in jobs}
