"""Latency-driven choice of compression passes for a target, within an accuracy budget.

Greedy search over the candidates of the target's profile (pruning ratios, low-rank energies,
int8): each round applies every remaining candidate to the current model, compiles it for the
target, and measures it there (locally, over RPC, or with the target's cycle model). A candidate
is kept only if it makes the *measured* latency lower and keeps the accuracy within the budget;
of those, the one with the most latency saved per accuracy lost wins the round. Every trial is
kept, and the Pareto front of (latency, accuracy) over all of them is reported.

Accuracy is top-1 on labelled validation data, or, without labels, top-1 agreement with the
uncompressed model on the validation (or calibration) inputs; it is measured on the compiled
artifact where the target runs here, and with ONNX Runtime on the same ONNX model otherwise
(the report says which).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import ort
from .calibration import Calibration
from .compile import CompileOptions, compile_model
from .config import Profile, Target
from .errors import HwcError
from .fileio import save_model


@dataclass
class Candidate:
    name: str
    family: str  # one candidate per family is applied (a second prune of a pruned model is another round)
    apply: Callable[[onnx.ModelProto], onnx.ModelProto]


@dataclass
class Trial:
    round: int
    candidate: str
    latency_ms: float | None
    latency_method: str
    accuracy: float
    accepted: bool = False
    chosen: bool = False
    reason: str = ""
    kernels_ms: dict[str, float] = field(default_factory=dict)  # per fused layer, where measured here


@dataclass
class SearchResult:
    model: onnx.ModelProto
    applied: list[str]
    baseline_latency_ms: float | None
    baseline_accuracy: float
    latency_ms: float | None
    accuracy: float
    accuracy_metric: str
    accuracy_measured_on: str
    trials: list[Trial] = field(default_factory=list)

    def pareto(self) -> list[dict[str, Any]]:
        points = [t for t in self.trials if t.latency_ms is not None]
        front = [t for t in points if not any(o.latency_ms <= t.latency_ms and o.accuracy >= t.accuracy and
                                              (o.latency_ms < t.latency_ms or o.accuracy > t.accuracy) for o in points)]
        return [asdict(t) for t in sorted(front, key=lambda t: t.latency_ms)]

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "baseline_latency_ms": self.baseline_latency_ms,
                "baseline_accuracy": self.baseline_accuracy, "latency_ms": self.latency_ms,
                "accuracy": self.accuracy, "accuracy_drop": self.baseline_accuracy - self.accuracy,
                "accuracy_metric": self.accuracy_metric, "accuracy_measured_on": self.accuracy_measured_on,
                "trials": [asdict(t) for t in self.trials], "pareto": self.pareto()}


def candidates(profile: Profile, target: Target, calibration: Calibration | None) -> list[Candidate]:
    """The profile's passes as candidates, with the target's multiples and dtypes."""
    from .factorization import lowrank_model
    from .pruning import prune_model
    from .quantization import quantize_model

    passes = profile.passes
    found: list[Candidate] = []
    prune = passes.get("prune", {})
    if prune.get("enabled"):
        for ratio in prune.get("ratios", [0.3]):
            found.append(Candidate(f"prune {ratio:g}", "prune", lambda m, r=ratio: prune_model(
                m, r, target.channel_multiple, prune.get("importance", "l1"), calibration=calibration,
                reconstruct=prune.get("reconstruct", True) and calibration is not None)[0]))
    lowrank = passes.get("lowrank", {})
    if lowrank.get("enabled"):
        for energy in lowrank.get("energies", [0.95]):
            found.append(Candidate(f"lowrank {energy:g}", "lowrank", lambda m, e=energy: lowrank_model(
                m, e, methods=tuple(lowrank.get("methods", ("svd", "spatial", "tucker2"))),
                multiple=target.rank_multiple,
                calibration=calibration if lowrank.get("data_aware", True) else None)[0]))
    quantize = passes.get("quantize", {})
    if quantize.get("enabled") and calibration is not None:
        for scheme in quantize.get("schemes", ["int8"]):
            if scheme in target.dtypes:
                found.append(Candidate(scheme, "quantize", lambda m, s=scheme: quantize_model(
                    m, calibration, s, quantize.get("calibration", "percentile"),
                    target.int8.get("activation") == "symmetric")[0]))
    return found


class Evaluator:
    """Compiles and measures a model on the target; scores it on the validation inputs."""

    def __init__(self, target: Target, options: CompileOptions, inputs: list[dict[str, np.ndarray]],
                 labels: np.ndarray | None, reference: onnx.ModelProto, scratch: Path,
                 progress: Callable[[str], None]):
        self.target, self.options, self.inputs, self.labels = target, options, inputs, labels
        self.scratch, self.progress = scratch, progress
        self.count = 0
        self.on_artifact = target.latency["method"] == "local" and not options.device
        self.reference_top1 = None if labels is not None else self._predict_ort(reference)

    def __call__(self, model: onnx.ModelProto) -> tuple[float | None, str, float, dict]:
        """Latency (ms), how it was obtained, accuracy, and the compile report with kernel times."""
        self.count += 1
        folder = self.scratch / f"trial{self.count}"
        save_model(model, folder / "model.onnx")
        options = CompileOptions(**{**self.options.__dict__, "target": self.target.name})
        report = compile_model(folder / "model.onnx", folder / "out", options, lambda _: None)
        predictions = self._predict_artifact(folder / "out" / "model.so") if self.on_artifact else self._predict_ort(model)
        if self.on_artifact:
            from .measure import kernel_times

            report["kernels_ms"] = kernel_times(folder / "out" / "model.so", self.inputs[0], list(self.inputs[0]))
        return report["latency"]["median_ms"], report["latency"]["method"], self._score(predictions), report

    def _score(self, predictions: np.ndarray) -> float:
        truth = self.labels if self.labels is not None else self.reference_top1
        return float((predictions == truth).mean() * 100.0)

    def _predict_ort(self, model: onnx.ModelProto) -> np.ndarray:
        quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        session = ort.session(model, exact=quantized)
        return np.array([session.run(None, feed)[0].reshape(-1).argmax() for feed in self.inputs])

    def _predict_artifact(self, library: Path) -> np.ndarray:
        from .tvm_build import outputs_to_numpy, run_local

        names = list(self.inputs[0])
        vm, device, _ = run_local(library, self.inputs[0], names)
        import tvm

        out = []
        for feed in self.inputs:
            args = [tvm.runtime.tensor(feed[n], device) for n in names]
            out.append(outputs_to_numpy(vm["main"](*args))[0].reshape(-1).argmax())
        return np.array(out)


def search(model: onnx.ModelProto, target: Target, profile: Profile, options: CompileOptions,
           calibration: Calibration | None, val_inputs: list[dict[str, np.ndarray]] | None,
           labels: np.ndarray | None, max_accuracy_drop: float, min_gain: float = 0.02,
           max_rounds: int = 3, progress: Callable[[str], None] = lambda _: None) -> SearchResult:
    inputs = val_inputs or (calibration.feeds if calibration else None)
    if not inputs:
        raise HwcError("the search needs inputs to score accuracy on: --val (with --labels) or --calib")
    if labels is not None and len(labels) != len(inputs):
        raise HwcError(f"--labels has {len(labels)} entries for {len(inputs)} validation samples")
    pool = candidates(profile, target, calibration)
    with tempfile.TemporaryDirectory(prefix="hwc-search-") as scratch:
        evaluate = Evaluator(target, options, inputs, labels, model, Path(scratch), progress)
        progress(f"search: baseline on {target.name}")
        base_latency, method, base_accuracy, base_report = evaluate(model)
        result = SearchResult(model, [], base_latency, base_accuracy, base_latency, base_accuracy,
                              "top-1 (%)" if labels is not None else "top-1 agreement with the uncompressed model (%)",
                              "compiled artifact" if evaluate.on_artifact else "ONNX Runtime on the same ONNX model")
        result.trials.append(Trial(0, "baseline", base_latency, method, base_accuracy, True, True,
                                   kernels_ms=base_report.get("kernels_ms", {})))
        if base_latency is None:
            raise HwcError(f"target {target.name} cannot be measured here (no device, no model): the search "
                           f"needs a latency; give --device rpc://HOST:PORT/KEY")
        for round_index in range(1, max_rounds + 1):
            best = None
            families = {c.family for c in pool if c.name in result.applied}
            eligible = [c for c in pool if c.name not in result.applied and "quantize" not in families
                        and (c.family == "prune" or c.family not in families)]
            for candidate in eligible:
                start = time.monotonic()
                try:
                    trial_model = candidate.apply(result.model)
                    latency, method, accuracy, trial_report = evaluate(trial_model)
                except HwcError as exc:
                    result.trials.append(Trial(round_index, candidate.name, None, "failed", float("nan"),
                                               reason=str(exc)))
                    progress(f"search round {round_index}: {candidate.name} failed: {exc}")
                    continue
                trial = Trial(round_index, candidate.name, latency, method, accuracy,
                              kernels_ms=trial_report.get("kernels_ms", {}))
                if latency >= result.latency_ms * (1 - min_gain):
                    trial.reason = f"measured latency {latency:.3f} ms is not {min_gain:.0%} below {result.latency_ms:.3f} ms"
                elif base_accuracy - accuracy > max_accuracy_drop:
                    trial.reason = f"accuracy drop {base_accuracy - accuracy:.2f} pt exceeds the budget {max_accuracy_drop:g}"
                else:
                    trial.accepted = True
                    gain = (result.latency_ms - latency) / max(result.accuracy - accuracy, 0.01)
                    if best is None or gain > best[0]:
                        best = (gain, trial, trial_model)
                result.trials.append(trial)
                progress(f"search round {round_index}: {candidate.name}: {latency:.3f} ms ({method}), accuracy "
                         f"{accuracy:.2f} -> {'kept' if trial.accepted else 'rejected: ' + trial.reason} "
                         f"[{time.monotonic() - start:.0f} s]")
            if best is None:
                break
            _, trial, trial_model = best
            trial.chosen = True
            result.model, result.latency_ms, result.accuracy = trial_model, trial.latency_ms, trial.accuracy
            result.applied.append(trial.candidate)
    return result
