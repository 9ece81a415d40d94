"""Scoring one candidate: built by the one build sequence, timed by the target's measurer, checked
against ONNX Runtime, and scored for accuracy on the artifact where it runs here (with ONNX Runtime
on the same ONNX model otherwise). Everything stays in memory; only the library touches the disk."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from ..backend.build import BuildOptions, build_model
from ..config.targets import Target
from ..measure.latency import Job, Latency, Measurer
from ..model import reference
from .metrics import cosine_similarity, metric_for, sqnr_db


@dataclass
class Evaluation:
    latency: Latency
    accuracy: float
    kernels_ms: dict[str, float] = field(default_factory=dict)  # per fused layer, where measured here
    fidelity: dict[str, list[float]] = field(default_factory=dict)  # per output vs the uncompressed model

    @property
    def latency_ms(self) -> float | None:
        return self.latency.median_ms

    @property
    def method(self) -> str:
        return self.latency.method


class Evaluator:
    """Builds and measures a model on the target; scores it on the validation inputs with the
    metric (``metrics``: top-1, agreement, output fidelity or the user's own).

    Where the target runs here, a candidate is timed in alternating rounds beside the model the
    search holds (``adopt``), and its latency is that ratio times the held model's: on this
    project's 2-core machines one model's figure moved between 2.2 and 3.8 ms from one process to
    the next, which made a pruned MobileNetV2 read 30 % slower than the baseline timed minutes
    before. The held model's library is kept for that; the others are removed once the search
    adopts one."""

    def __init__(self, target: Target, build: BuildOptions, measurer: Measurer, inputs: list[dict[str, np.ndarray]],
                 labels: np.ndarray | None, uncompressed: onnx.ModelProto, scratch: Path, tolerance: float = 1e-3,
                 metric: str | None = None):
        self.target, self.build, self.measurer = target, build, measurer
        self.inputs, self.labels, self.scratch, self.tolerance = inputs, labels, scratch, tolerance
        self.count = 0
        self.reference = self._outputs_ort(uncompressed)
        self.metric = metric_for(metric, labels, self.reference)
        self.held: tuple[Job, Latency] | None = None  # the model the search holds, and its latency
        self._built: dict[int, tuple[Job, Latency, Path]] = {}  # id(model) -> its library, until one is adopted

    def __call__(self, model: onnx.ModelProto) -> Evaluation:
        self.count += 1
        folder = self.scratch / f"trial{self.count}"
        try:
            artifact = build_model(model, self.target, self.build, folder)
            feeds = reference.random_inputs(model, seed=0)
            job = Job("candidate", artifact.library, feeds, artifact.input_names, model)
            measured = self.measurer.measure(job)
            if measured.outputs is not None:
                reference.check_outputs(model, reference.reference_outputs(model, feeds), measured.outputs,
                                        self.tolerance)
            outputs = self.measurer.run_many(job, self.inputs)
            if outputs is None:
                outputs = self._outputs_ort(model)
            kernels = self.measurer.kernel_times(Job("kernels", artifact.library, self.inputs[0],
                                                     artifact.input_names, model))
            latency = self._beside_held(job, measured.latency)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._built[id(model)] = (job, latency, folder)
        return Evaluation(latency, self.metric.score(outputs), kernels, self._fidelity(outputs))

    def adopt(self, model: onnx.ModelProto) -> None:
        """The search now holds ``model`` (evaluated before): later candidates are timed beside it."""
        job, latency, folder = self._built.pop(id(model))
        for _, _, other in self._built.values():
            shutil.rmtree(other, ignore_errors=True)
        if self.held is not None:
            shutil.rmtree(self.held[0].library.parent, ignore_errors=True)
        self._built = {}
        self.held = (job, latency)

    def _beside_held(self, job: Job, latency: Latency) -> Latency:
        if self.held is None or latency.median_ms is None or self.held[1].median_ms is None:
            return latency
        ratio = self.measurer.ratio(job, self.held[0])
        if ratio is None:
            return latency
        scale = self.held[1].median_ms * ratio / latency.median_ms
        return replace(latency, median_ms=latency.median_ms * scale, p90_ms=latency.p90_ms * scale,
                       min_ms=latency.min_ms * scale)

    def score_ort(self, model: onnx.ModelProto) -> float:
        """The metric on the ONNX model with ONNX Runtime (a per-layer candidate before it is built)."""
        return self.metric.score(self._outputs_ort(model))

    def _fidelity(self, outputs) -> dict[str, list[float]]:
        return {"sqnr_db": [round(v, 2) if math.isfinite(v) else None for v in sqnr_db(self.reference, outputs)],
                "cosine": [round(v, 6) for v in cosine_similarity(self.reference, outputs)]}

    def _outputs_ort(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        session = reference.session(model, exact=reference.is_quantized(model))
        return [session.run(None, feed) for feed in self.inputs]
