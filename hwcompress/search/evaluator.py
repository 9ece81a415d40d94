"""Scoring one candidate: built by the one build sequence, timed by the target's measurer, checked
against ONNX Runtime, and scored for accuracy on the artifact where it runs here (with ONNX Runtime
on the same ONNX model otherwise). Everything stays in memory; only the library touches the disk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..backend.build import BuildOptions, build_model
from ..config.targets import Target
from ..measure.latency import Job, Latency, Measurer
from ..model import reference


@dataclass
class Evaluation:
    latency: Latency
    accuracy: float
    kernels_ms: dict[str, float] = field(default_factory=dict)  # per fused layer, where measured here

    @property
    def latency_ms(self) -> float | None:
        return self.latency.median_ms

    @property
    def method(self) -> str:
        return self.latency.method


class Evaluator:
    """Builds and measures a model on the target; scores it on the validation inputs."""

    def __init__(self, target: Target, build: BuildOptions, measurer: Measurer, inputs: list[dict[str, np.ndarray]],
                 labels: np.ndarray | None, uncompressed: onnx.ModelProto, scratch: Path, tolerance: float = 1e-3):
        self.target, self.build, self.measurer = target, build, measurer
        self.inputs, self.labels, self.scratch, self.tolerance = inputs, labels, scratch, tolerance
        self.count = 0
        self.reference_top1 = None if labels is not None else self._predict_ort(uncompressed)

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
            predictions = (np.array([o[0].reshape(-1).argmax() for o in outputs]) if outputs is not None
                           else self._predict_ort(model))
            kernels = self.measurer.kernel_times(Job("kernels", artifact.library, self.inputs[0],
                                                     artifact.input_names, model))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return Evaluation(measured.latency, self._score(predictions), kernels)

    def score_ort(self, model: onnx.ModelProto) -> float:
        """Accuracy of the ONNX model with ONNX Runtime (a per-layer candidate before it is built)."""
        return self._score(self._predict_ort(model))

    def _score(self, predictions: np.ndarray) -> float:
        truth = self.labels if self.labels is not None else self.reference_top1
        return float((predictions == truth).mean() * 100.0)

    def _predict_ort(self, model: onnx.ModelProto) -> np.ndarray:
        session = reference.session(model, exact=reference.is_quantized(model))
        return np.array([session.run(None, feed)[0].reshape(-1).argmax() for feed in self.inputs])
