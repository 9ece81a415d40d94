"""Latency-driven choice of compression passes for a target, within an accuracy budget.

Greedy search over the candidates of the target's profile. Two kinds of candidate:

- whole-model passes (low-rank energies, int8, pow2, and global pruning ratios when the profile
  does not prune per layer): each is applied to the current model, compiled for the target and
  measured there (locally, over RPC, or with the target's cycle model);
- per-layer pruning steps (NetAdapt): for every group of coupled layers and every step, the new
  layer shapes are looked up in the target's latency table (``latency_table``), which predicts the
  latency saved; the most promising steps are applied (with reconstruction) and scored. With
  ``quantize.per_layer``, the int8 candidate likewise quantizes only the layers whose int8 form
  (lowered to integer compute) the table measures faster than fp32; where the target and profile
  allow pow2, "int8 + pow2 (per layer)" gives pow2 weights to the layers whose pow2 form the table
  prices faster than int8 (a cycle model counts their 4-bit weights), int8 to the rest.

A candidate is kept only if it makes the latency lower and keeps the accuracy within the budget;
of those, the one with the most latency saved per accuracy lost wins the round. A per-layer winner
is then compiled and measured end to end: if the measurement does not confirm the table's
prediction it is rejected and the next best is tried. So nothing is ever applied that did not
measure faster. Every trial is kept (with the table's prediction next to the measurement), and the
Pareto front of (latency, accuracy) over all of them is reported.

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
    predicted_ms: float | None = None  # the latency table's prediction (per-layer candidates)
    layers: dict[str, list[int]] = field(default_factory=dict)  # per-layer step: layer -> [before, after]


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
    table_info: dict[str, Any] | None = None  # the per-layer latency table used, if any

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
                "trials": [asdict(t) for t in self.trials], "pareto": self.pareto(),
                "latency_table": self.table_info}


class NotFaster(HwcError):
    """The latency table predicts no saving: the candidate is not built (a decision, not a failure)."""


def _faster_forms(model: onnx.ModelProto, table, reference: Callable, candidate: Callable,
                  min_gain: float) -> tuple[list[str], list[str]]:
    """The quantizable layers, and those whose ``candidate`` form the latency table prices at least
    ``min_gain`` faster than their ``reference`` form. Candidate forms are timed within the table's
    budget, biggest layers first; a layer left without a figure counts as not faster."""
    from .graph import Graph
    from .latency_table import model_layers
    from .passes.quantize import quantizable_layers

    layers = model_layers(model)
    names = sorted((n.name for n in quantizable_layers(Graph(model)) if n.name in layers),
                   key=lambda n: -layers[n].macs)
    figures = table.latencies([reference(layers[n]) for n in names])
    figures.update(table.latencies([candidate(layers[n]) for n in names], within_budget=True))
    faster = [n for n in names if figures.get(candidate(layers[n]), float("inf"))
              < figures[reference(layers[n])] * (1 - min_gain)]
    return names, faster


def int8_layers_to_keep_fp32(model: onnx.ModelProto, table, symmetric: bool, min_gain: float = 0.02) -> list[str]:
    """Layers whose int8 form (lowered to integer compute) is not measured faster than fp32."""
    names, faster = _faster_forms(model, table, lambda spec: spec, lambda spec: spec.as_int8(symmetric), min_gain)
    if not faster:
        raise NotFaster(f"the latency table measures int8 no faster than fp32 in any of the {len(names)} layers"
                        + ("" if table.budget_left() else " it had the budget to time"))
    return [n for n in names if n not in faster]


def pow2_layers_faster(model: onnx.ModelProto, table, symmetric: bool, min_gain: float = 0.02) -> list[str]:
    """Layers whose pow2 form the latency table prices faster than their int8 form."""
    names, faster = _faster_forms(model, table, lambda spec: spec.as_int8(symmetric), lambda spec: spec.as_pow2(),
                                  min_gain)
    if not faster:
        raise NotFaster(f"the latency table prices pow2 weights no faster than int8 in any of the {len(names)} layers")
    return faster


def candidates(profile: Profile, target: Target, calibration: Calibration | None, table=None) -> list[Candidate]:
    """The profile's passes as candidates, with the target's multiples and dtypes. With a latency
    table and ``quantize.per_layer``, int8 is applied only to the layers it makes faster."""
    from .factorization import lowrank_model
    from .pruning import prune_model
    from .quantization import quantize_model

    passes = profile.passes
    found: list[Candidate] = []
    prune = passes.get("prune", {})
    if prune.get("enabled") and not prune.get("per_layer"):
        for ratio in prune.get("ratios", [0.3]):
            found.append(Candidate(f"prune {ratio:g}", "prune", lambda m, r=ratio: prune_model(
                m, r, target.channel_multiple, prune.get("importance", "l1"), calibration=calibration,
                reconstruct=prune.get("reconstruct", True) and calibration is not None)[0]))
    lowrank = passes.get("lowrank", {})
    if lowrank.get("enabled") and not lowrank.get("per_layer"):
        for energy in lowrank.get("energies", [0.95]):
            found.append(Candidate(f"lowrank {energy:g}", "lowrank", lambda m, e=energy: lowrank_model(
                m, e, methods=tuple(lowrank.get("methods", ("svd", "spatial", "tucker2"))),
                multiple=target.rank_multiple,
                calibration=calibration if lowrank.get("data_aware", True) else None)[0]))
    quantize = passes.get("quantize", {})
    if quantize.get("enabled") and calibration is not None:
        symmetric = target.int8.get("activation") == "symmetric"
        per_layer = table is not None and quantize.get("per_layer", False)
        for scheme in quantize.get("schemes", ["int8"]):
            if scheme in target.dtypes:
                def apply(m, s=scheme):
                    keep = int8_layers_to_keep_fp32(m, table, symmetric) if per_layer and s == "int8" else ()
                    return quantize_model(m, calibration, s, quantize.get("calibration", "percentile"), symmetric,
                                          keep_fp32=tuple(keep))[0]
                found.append(Candidate(scheme + (" (per layer)" if per_layer and scheme == "int8" else ""),
                                       "quantize", apply))
        if per_layer and {"int8", "pow2"} <= set(quantize.get("schemes", [])) & set(target.dtypes):
            def mixed(m):  # int8, with pow2 weights where the table prices them faster
                pow2 = pow2_layers_faster(m, table, symmetric)
                return quantize_model(m, calibration, "int8", quantize.get("calibration", "percentile"), symmetric,
                                      pow2_layers=tuple(pow2))[0]
            found.append(Candidate("int8 + pow2 (per layer)", "quantize", mixed))
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

    def score_ort(self, model: onnx.ModelProto) -> float:
        """Accuracy of the ONNX model with ONNX Runtime (a per-layer candidate before it is compiled)."""
        return self._score(self._predict_ort(model))

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


@dataclass
class LayerStep:
    """One per-layer rewrite (prune a group of coupled layers by a step, or factorize one layer),
    with the latency table's prediction of what it saves."""

    name: str
    apply: Callable[[onnx.ModelProto], onnx.ModelProto]  # the full rewrite (reconstruction, data-aware)
    shapes: dict[str, list[int]]  # pruning: layer -> [channels before, after]; low-rank: layer -> ranks
    saving_ms: float | None = None  # None: not priced (the table's budget ran out before its shapes)


class LayerSteps:
    """Per-layer candidates of the current model, ranked by the latency table.

    Every step is first applied cheaply (no reconstruction) to learn the layer shapes it leaves;
    the table prices those shapes, so pruning and factorization are compared on one scale."""

    def __init__(self, profile: Profile, target: Target, table, calibration: Calibration | None):
        self.prune, self.lowrank = profile.passes.get("prune", {}), profile.passes.get("lowrank", {})
        self.target, self.table, self.calibration = target, table, calibration

    def propose(self, model: onnx.ModelProto) -> tuple[list[LayerStep], list[LayerStep]]:
        """The priced steps, most saving first, and those the table's budget left unpriced.

        Steps are priced in order of multiply-accumulates removed, so a budget spends itself on the
        steps most likely to matter; the decision itself is the table's latency, never the MACs."""
        from .latency_table import model_layers

        current, _ = self.table.predict_ms(model)
        steps = []
        if self.prune.get("enabled") and self.prune.get("per_layer"):
            steps += self._prune_steps(model)
        if self.lowrank.get("enabled") and self.lowrank.get("per_layer"):
            steps += self._lowrank_steps(model)
        previews = [(step, model_layers(preview)) for step, preview in steps]
        previews.sort(key=lambda item: sum(spec.macs for spec in item[1].values()))
        priced, unpriced = [], []
        for step, layers in previews:
            predicted = self.table.predict_layers_ms(layers)
            if predicted is None:
                unpriced.append(step)
            else:
                step.saving_ms = current - predicted
                priced.append(step)
        return sorted(priced, key=lambda st: -st.saving_ms), unpriced

    def _prune_steps(self, model: onnx.ModelProto) -> list[tuple[LayerStep, onnx.ModelProto]]:
        from .graph import Graph
        from .passes import prune_channels
        from .passes.channel_groups import analyze
        from .pruning import prune_model

        found: dict[tuple, tuple[LayerStep, onnx.ModelProto]] = {}
        multiple, reconstruct = self.target.channel_multiple, self.prune.get("reconstruct", True)
        for group in analyze(Graph(model)).coupled_layers():
            for ratio in self.prune.get("ratios", [0.25]):
                ratios = {node: ratio for node in group}
                try:
                    applied = prune_channels.apply(model, ratio=0.0, layer_ratios=ratios, multiple=multiple)
                except HwcError:
                    continue  # nothing to remove at this step (at the channel multiple)
                shapes = {n: [v["before"], v["after"]] for n, v in applied.log.details["layers"].items()
                          if v["before"] != v["after"]}
                key = tuple(sorted((n, a) for n, (_, a) in shapes.items()))
                if key and key not in found:
                    first = group[0] + (f" (+{len(group) - 1} coupled)" if len(group) > 1 else "")
                    before, after = shapes.get(group[0], next(iter(shapes.values())))
                    apply = (lambda m, r=ratios: prune_model(
                        m, 0.0, multiple, self.prune.get("importance", "l1"), layer_ratios=r,
                        calibration=self.calibration, reconstruct=reconstruct and self.calibration is not None)[0])
                    found[key] = (LayerStep(f"prune {first} {before}->{after}", apply, shapes), applied.model)
        return list(found.values())

    def _lowrank_steps(self, model: onnx.ModelProto) -> list[tuple[LayerStep, onnx.ModelProto]]:
        from .factorization import lowrank_model
        from .passes.lowrank import lowrank

        found = []
        methods = tuple(self.lowrank.get("methods", ("svd", "spatial", "tucker2")))
        knobs = dict(methods=methods, multiple=self.target.rank_multiple)
        for name in model_layer_names(model):
            for energy in self.lowrank.get("energies", [0.95]):
                applied = lowrank.apply(model, energy=energy, layers=(name,), **knobs)
                done = applied.log.details["layers"].get(name)
                if not done:
                    continue  # no method saves enough here
                calibration = self.calibration if self.lowrank.get("data_aware", True) else None
                apply = (lambda m, e=energy, n=name: lowrank_model(m, e, layers=(n,), calibration=calibration,
                                                                   **knobs)[0])
                label = f"lowrank {name} {done['method']} rank {'x'.join(map(str, done['ranks']))} (energy {energy:g})"
                found.append((LayerStep(label, apply, {name: list(done["ranks"])}), applied.model))
        return found


DEFAULT_TABLE_BUDGET_S = 1200  # per search run, for layer shapes beyond the model's own


def model_layer_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def _layer_table(profile: Profile, target: Target, options: CompileOptions, progress):
    from .latency_table import LatencyTable
    from .tvm_build import default_cache_dir

    if not any(p.get("enabled") and p.get("per_layer") for p in profile.passes.values()):
        return None
    cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    trials = profile.search.get("layer_trials", 32) if options.tune_trials > 0 else 0
    return LatencyTable(target, cache, trials, options.device, progress,
                        budget_s=profile.search.get("table_budget_s", DEFAULT_TABLE_BUDGET_S))


def search(model: onnx.ModelProto, target: Target, profile: Profile, options: CompileOptions,
           calibration: Calibration | None, val_inputs: list[dict[str, np.ndarray]] | None,
           labels: np.ndarray | None, max_accuracy_drop: float, min_gain: float = 0.02,
           max_rounds: int | None = None, progress: Callable[[str], None] = lambda _: None) -> SearchResult:
    inputs = val_inputs or (calibration.feeds if calibration else None)
    if not inputs:
        raise HwcError("the search needs inputs to score accuracy on: --val (with --labels) or --calib")
    if labels is not None and len(labels) != len(inputs):
        raise HwcError(f"--labels has {len(labels)} entries for {len(inputs)} validation samples")
    settings = profile.search
    max_rounds = max_rounds or settings.get("max_rounds", 3)
    table = _layer_table(profile, target, options, progress)
    pool = candidates(profile, target, calibration, table)
    layer_steps = LayerSteps(profile, target, table, calibration) if table else None
    with tempfile.TemporaryDirectory(prefix="hwc-search-") as scratch:
        evaluate = Evaluator(target, options, inputs, labels, model, Path(scratch), progress)
        progress(f"search: baseline on {target.name}")
        base_latency, method, base_accuracy, base_report = evaluate(model)
        result = SearchResult(model, [], base_latency, base_accuracy, base_latency, base_accuracy,
                              "top-1 (%)" if labels is not None else "top-1 agreement with the uncompressed model (%)",
                              "compiled artifact" if evaluate.on_artifact else "ONNX Runtime on the same ONNX model")
        baseline = Trial(0, "baseline", base_latency, method, base_accuracy, True, True,
                         kernels_ms=base_report.get("kernels_ms", {}))
        result.trials.append(baseline)
        if base_latency is None:
            raise HwcError(f"target {target.name} cannot be measured here (no device, no model): the search "
                           f"needs a latency; give --device rpc://HOST:PORT/KEY")
        if table is not None:
            baseline.predicted_ms = table.predict_ms(model)[0]
        for round_index in range(1, max_rounds + 1):
            families = {c.family for c in pool if c.name in result.applied}
            eligible = [c for c in pool if c.name not in result.applied and "quantize" not in families
                        and (c.family == "prune" or c.family not in families)]
            kept: list[tuple[bool, float, Trial, Any]] = []  # (quantizes, gain, trial, model)
            structural = settings.get("layer_candidates", 4) if layer_steps and "quantize" not in families else 0
            total = structural + len(eligible)
            if structural:  # first: the table's budget goes to structure before precision
                kept += _layer_trials(layer_steps, round_index, result, evaluate, base_accuracy, max_accuracy_drop,
                                      min_gain, structural, progress, 0, total)
            for index, candidate in enumerate(eligible, structural + 1):
                trial, trial_model = _measured_trial(candidate, round_index, result, evaluate, base_accuracy,
                                                     max_accuracy_drop, min_gain, progress, f"[{index}/{total}]")
                if trial.accepted:
                    # Precision last: a quantized (QDQ) model is not pruned or factorized any further,
                    # so int8/pow2 wins a round only when no structural candidate is left.
                    kept.append((candidate.family == "quantize", _gain(result, trial.latency_ms, trial.accuracy),
                                 trial, trial_model))
            if not _choose(kept, result, evaluate, base_accuracy, max_accuracy_drop, min_gain, progress):
                break
        if table is not None:
            result.table_info = {"file": str(table.cache.path), "method": table.method, "layer_trials": table.trials,
                                 "figures_made_in_this_run": table.measured,
                                 "budget_s": table.budget_s, "spent_s": round(table.spent_s, 1),
                                 "chosen_predicted_ms": table.predict_ms(result.model)[0],
                                 "baseline_predicted_ms": baseline.predicted_ms}
    return result


def _gain(result: SearchResult, latency: float, accuracy: float) -> float:
    return (result.latency_ms - latency) / max(result.accuracy - accuracy, 0.01)


def _measured_trial(candidate: Candidate, round_index: int, result: SearchResult, evaluate: Evaluator,
                    base_accuracy: float, max_accuracy_drop: float, min_gain: float, progress, counter: str):
    start = time.monotonic()
    try:
        trial_model = candidate.apply(result.model)
        latency, method, accuracy, trial_report = evaluate(trial_model)
    except NotFaster as exc:
        trial = Trial(round_index, candidate.name, None, "table", float("nan"), reason=str(exc))
        result.trials.append(trial)
        progress(f"{counter} search round {round_index}: {candidate.name}: not built: {exc}")
        return trial, None
    except HwcError as exc:
        trial = Trial(round_index, candidate.name, None, "failed", float("nan"), reason=str(exc))
        result.trials.append(trial)
        progress(f"{counter} search round {round_index}: {candidate.name} failed: {exc}")
        return trial, None
    trial = Trial(round_index, candidate.name, latency, method, accuracy, kernels_ms=trial_report.get("kernels_ms", {}))
    _judge(trial, result, base_accuracy, max_accuracy_drop, min_gain)
    result.trials.append(trial)
    progress(f"{counter} search round {round_index}: {candidate.name}: {latency:.3f} ms ({method}), accuracy "
             f"{accuracy:.2f} -> {'kept' if trial.accepted else 'rejected: ' + trial.reason} "
             f"[{time.monotonic() - start:.0f} s]")
    return trial, trial_model


def _judge(trial: Trial, result: SearchResult, base_accuracy: float, max_accuracy_drop: float, min_gain: float) -> None:
    if trial.latency_ms >= result.latency_ms * (1 - min_gain):
        trial.reason = f"measured latency {trial.latency_ms:.3f} ms is not {min_gain:.0%} below {result.latency_ms:.3f} ms"
    elif base_accuracy - trial.accuracy > max_accuracy_drop:
        trial.reason = f"accuracy drop {base_accuracy - trial.accuracy:.2f} pt exceeds the budget {max_accuracy_drop:g}"
    else:
        trial.accepted = True


def _layer_trials(steps: LayerSteps, round_index: int, result: SearchResult, evaluate: Evaluator,
                  base_accuracy: float, max_accuracy_drop: float, min_gain: float, how_many: int, progress,
                  done: int, total: int) -> list[tuple[bool, float, Trial, Any]]:
    """Score the per-layer steps the table predicts to save the most; the rest are recorded as such."""
    proposals, unpriced = steps.propose(result.model)
    for st in unpriced:
        result.trials.append(Trial(round_index, st.name, None, "table", float("nan"), layers=st.shapes,
                                   reason=f"not priced: the latency table's budget ({steps.table.budget_s:g} s "
                                          f"per run) was spent first; a later run continues from the cache"))
    if unpriced:
        progress(f"search round {round_index}: {len(unpriced)} per-layer step(s) not priced (table budget spent)")
    threshold = result.latency_ms * min_gain
    promising = [st for st in proposals if st.saving_ms > threshold][:how_many]
    for st in proposals:
        if st not in promising:
            why = (f"the latency table predicts {st.saving_ms:.4f} ms saved, not {min_gain:.0%} of "
                   f"{result.latency_ms:.3f} ms" if st.saving_ms <= threshold else
                   f"the table predicts less saving ({st.saving_ms:.4f} ms) than the {how_many} steps tried")
            result.trials.append(Trial(round_index, st.name, None, "table", float("nan"), reason=why,
                                       predicted_ms=result.latency_ms - st.saving_ms, layers=st.shapes))
    kept = []
    for index, st in enumerate(promising, done + 1):
        start = time.monotonic()
        predicted = result.latency_ms - st.saving_ms
        try:
            model = st.apply(result.model)
            accuracy = evaluate.score_ort(model)
        except HwcError as exc:
            result.trials.append(Trial(round_index, st.name, None, "failed", float("nan"), reason=str(exc),
                                       layers=st.shapes))
            continue
        trial = Trial(round_index, st.name, None, "table", accuracy, predicted_ms=predicted, layers=st.shapes)
        if base_accuracy - accuracy > max_accuracy_drop:
            trial.reason = f"accuracy drop {base_accuracy - accuracy:.2f} pt exceeds the budget {max_accuracy_drop:g}"
        else:
            trial.accepted = True
            kept.append((False, _gain(result, predicted, accuracy), trial, model))
        result.trials.append(trial)
        progress(f"[{index}/{total}] search round {round_index}: {st.name}: table predicts {predicted:.3f} ms, "
                 f"accuracy {accuracy:.2f} (ONNX Runtime) -> {'kept' if trial.accepted else 'rejected: ' + trial.reason} "
                 f"[{time.monotonic() - start:.0f} s]")
    return kept


def _choose(kept: list[tuple[bool, float, Trial, Any]], result: SearchResult, evaluate: Evaluator,
            base_accuracy: float, max_accuracy_drop: float, min_gain: float, progress) -> bool:
    """Apply the best kept candidate whose end-to-end measurement confirms it; False if none does.

    Structure before precision: a quantized (QDQ) model is not pruned or factorized any further, so
    a quantizing candidate is taken only when no structural one is left (ties: most gain first)."""
    for _, _, trial, model in sorted(kept, key=lambda item: (item[0], -item[1])):
        if trial.latency_ms is None:  # a table prediction: measure the whole compiled model now
            latency, method, accuracy, report = evaluate(model)
            trial.latency_ms, trial.latency_method, trial.accuracy = latency, method, accuracy
            trial.kernels_ms = report.get("kernels_ms", {})
            trial.accepted = False
            _judge(trial, result, base_accuracy, max_accuracy_drop, min_gain)
            progress(f"end-to-end: {trial.candidate}: measured {latency:.3f} ms ({method}) for the table's "
                     f"{trial.predicted_ms:.3f} ms, accuracy {accuracy:.2f} on the compiled model -> "
                     f"{'applied' if trial.accepted else 'rejected: ' + trial.reason}")
            if not trial.accepted:
                trial.reason = "end-to-end check: " + trial.reason
                continue
        trial.chosen = True
        result.model, result.latency_ms, result.accuracy = model, trial.latency_ms, trial.accuracy
        result.applied.append(trial.candidate)
        return True
    return False
