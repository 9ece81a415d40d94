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
  prices faster than int8 (a cycle model counts their 4-bit weights), int8 to the rest;
- with ``prune.allocate``, in the first structural round: every group's ratio at once, allocated by
  each group's measured output error and the table's latency (``allocation``), one more per-layer
  candidate in place of that round's one-group pruning steps.

Where the target runs here, each candidate is timed in alternating rounds beside the model the
search holds, and its figure is that ratio times the held model's (``evaluator``): a figure taken
minutes apart on a shared machine moves by more than most savings.

A candidate is kept only if it makes the latency lower and keeps the accuracy within the budget;
of those, the one with the most latency saved per accuracy lost wins the round. A per-layer winner
is then compiled and measured end to end: if the measurement does not confirm the table's
prediction it is rejected and the next best is tried. So nothing is ever applied that did not
measure faster. Every trial is kept (with the table's prediction next to the measurement), and the
Pareto front of (latency, accuracy) over all of them is reported.

Accuracy is the metric of ``metrics``: top-1 on labelled validation data; without labels, top-1
agreement with the uncompressed model for a classifier and output cosine similarity for any other
model; or the user's own function. It is measured on the validation (or calibration) inputs, on the compiled
artifact where the target runs here, and with ONNX Runtime on the same ONNX model otherwise
(the report says which).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..backend.build import BuildOptions
from ..compress.profile import Profile
from ..config.targets import Target
from ..data.calibration import Calibration
from ..errors import HwcError
from ..measure.factory import measurer_for
from ..progress import SILENT, Progress
from .candidates import Candidate, NotFaster, candidates
from .evaluator import Evaluator
from .latency_table import LatencyTable
from .allocation import allocate
from .layer_steps import LayerSteps


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
    fidelity: dict[str, list[float]] = field(default_factory=dict)  # per output: SQNR (dB), cosine vs uncompressed


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
    budget_s: float | None = None
    spent_s: float = 0.0
    stopped: str | None = None  # why the search ended before running out of candidates or rounds
    allocation: dict[str, Any] | None = None  # the sensitivity allocation, where the profile asks for one

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
                "latency_table": self.table_info, "budget_s": self.budget_s, "spent_s": round(self.spent_s, 1),
                "stopped": self.stopped, "allocation": self.allocation}


class Deadline:
    """The search's wall-time budget: work already started finishes, nothing new starts after it."""

    def __init__(self, budget_s: float):
        self.budget_s, self.start = budget_s, time.monotonic()

    def spent_s(self) -> float:
        return time.monotonic() - self.start

    def left_s(self) -> float:
        return max(0.0, self.budget_s - self.spent_s())

    def passed(self) -> bool:
        return self.left_s() <= 0

    def unreached(self, round_index: int, candidate: str, **fields) -> "Trial":
        """The trial of a candidate the search did not evaluate for want of time."""
        return Trial(round_index, candidate, None, "budget", float("nan"),
                     reason=f"not evaluated: the search's time budget ({self.budget_s:g} s) was spent", **fields)


def _layer_table(profile: Profile, target: Target, build: BuildOptions, progress: Progress) -> LatencyTable | None:
    if not profile.per_layer:
        return None
    trials = profile.search.layer_trials if build.tune_trials > 0 else 0  # default 0: own kernels, untuned
    return LatencyTable(target, build.cache, trials, build.device, progress.at("latency table"),
                        budget_s=profile.search.table_budget_s, int8_compute=build.int8_compute,
                        winograd=build.winograd)


def search(model: onnx.ModelProto, target: Target, profile: Profile, build: BuildOptions,
           calibration: Calibration | None, val_inputs: list[dict[str, np.ndarray]] | None,
           labels: np.ndarray | None, max_accuracy_drop: float, min_gain: float = 0.02,
           max_rounds: int | None = None, repeat: int = 30, tolerance: float = 1e-3,
           progress: Progress = SILENT, metric: str | None = None, budget_s: float | None = None) -> SearchResult:
    """Greedy rounds over the profile's candidates within ``budget_s`` seconds (default: the
    profile's). ``build`` says how the model is built; candidates are built without tuning (the
    project's conv kernels and default schedules, with the records already in the tuning database:
    the same for every candidate, and no tuning per candidate), the final compile tunes the chosen
    model. ``repeat``: samples per measurement; ``metric``: what accuracy is (``metrics.metric_for``)."""
    inputs = val_inputs or (calibration.feeds if calibration else None)
    if not inputs:
        raise HwcError("the search needs inputs to score accuracy on: --val (with --labels) or --calib")
    if labels is not None and len(labels) != len(inputs):
        raise HwcError(f"--labels has {len(labels)} entries for {len(inputs)} validation samples")
    settings = profile.search
    max_rounds = max_rounds or settings.max_rounds
    deadline = Deadline(settings.budget_s if budget_s is None else budget_s)
    table = _layer_table(profile, target, build, progress)
    if table is not None:
        table.deadline = deadline  # new layer shapes are timed only while the search has time left
    pool = candidates(profile, target, calibration, table)
    layer_steps = LayerSteps(profile, target, table, calibration) if table else None
    measurer = measurer_for(target, build.device, repeat)
    untuned = replace(build, tune_trials=0)
    with tempfile.TemporaryDirectory(prefix="hwc-search-") as scratch:
        evaluate = Evaluator(target, untuned, measurer, inputs, labels, model, Path(scratch), tolerance, metric)
        progress(f"search: baseline on {target.name}")
        base = evaluate(model)
        evaluate.adopt(model)
        base_latency, method, base_accuracy = base.latency_ms, base.method, base.accuracy
        result = SearchResult(model, [], base_latency, base_accuracy, base_latency, base_accuracy,
                              evaluate.metric.name,
                              "compiled artifact" if measurer.runs_here else "ONNX Runtime on the same ONNX model")
        baseline = Trial(0, "baseline", base_latency, method, base_accuracy, True, True,
                         kernels_ms=base.kernels_ms, fidelity=base.fidelity)
        result.trials.append(baseline)
        if base_latency is None:
            raise HwcError(f"target {target.name} cannot be measured here (no device, no model): the search "
                           f"needs a latency; give --device rpc://HOST:PORT/KEY")
        result.budget_s = deadline.budget_s
        finished: _Finished | None = None  # the fastest accepted quantized model, whichever round
        for round_index in range(1, max_rounds + 1):
            families = {c.family for c in pool if c.name in result.applied}
            eligible = [c for c in pool if c.name not in result.applied and "quantize" not in families
                        and (c.family == "prune" or c.family not in families)]
            if deadline.passed():
                result.stopped = f"time budget ({deadline.budget_s:g} s) spent before round {round_index}"
                result.trials += [deadline.unreached(round_index, c.name) for c in eligible]
                progress(f"search: {result.stopped}")
                break
            kept: list[tuple[bool, float, Trial, Any]] = []  # (quantizes, gain, trial, model)
            structural = settings.layer_candidates if layer_steps and "quantize" not in families else 0
            total = structural + len(eligible)
            if structural and layer_steps.allocation_due:
                kept += _allocation_trial(layer_steps, round_index, result, evaluate, base_accuracy, max_accuracy_drop,
                                          progress, deadline)
            if structural:  # first: the table's budget goes to structure before precision
                kept += _layer_trials(layer_steps, round_index, result, evaluate, base_accuracy, max_accuracy_drop,
                                      min_gain, structural, progress, 0, total, deadline)
            for index, candidate in enumerate(eligible, structural + 1):
                if deadline.passed():
                    result.trials.append(deadline.unreached(round_index, candidate.name))
                    result.stopped = f"time budget ({deadline.budget_s:g} s) spent in round {round_index}"
                    continue
                trial, trial_model = _measured_trial(candidate, round_index, result, evaluate, base_accuracy,
                                                     max_accuracy_drop, min_gain, progress, index, total)
                if trial.accepted:
                    # Precision last: a quantized (QDQ) model is not pruned or factorized any further,
                    # so int8/pow2 wins a round only when no structural candidate is left.
                    kept.append((candidate.family == "quantize", _gain(result, trial.latency_ms, trial.accuracy),
                                 trial, trial_model))
            for quantizes, _, trial, trial_model in kept:
                if quantizes and trial.latency_ms is not None and (
                        finished is None or trial.latency_ms < finished.trial.latency_ms):
                    finished = _Finished(trial, trial_model, [*result.applied, trial.candidate])
            if not _choose(kept, result, evaluate, base_accuracy, max_accuracy_drop, min_gain, progress):
                break
        _finish_with_the_best(result, finished, progress)
        if table is not None:
            result.table_info = {"file": str(table.cache.path), "method": table.method, "layer_trials": table.trials,
                                 "figures_made_in_this_run": table.measured,
                                 "budget_s": table.budget_s, "spent_s": round(table.spent_s, 1),
                                 "chosen_predicted_ms": table.predict_ms(result.model)[0],
                                 "baseline_predicted_ms": table.predict_ms(model)[0]}
        result.spent_s = deadline.spent_s()
    return result


@dataclass
class _Finished:
    """An accepted quantizing trial: a model the search could end with (nothing follows int8)."""

    trial: Trial
    model: Any
    applied: list[str]


def _finish_with_the_best(result: SearchResult, finished: _Finished | None, progress: Progress) -> None:
    """End with the fastest accepted quantized model where it beats where the greedy rounds ended.

    Structure goes before precision (a QDQ model is not pruned further), so a structural step can
    spend the accuracy budget that int8 needed: measured on MobileNetV2, two pruning steps that
    saved 0.1 ms each left int8 1.6 pt over budget, and the search ended at 3.0 ms while the int8
    model of the round before, within budget, ran 1.7 ms."""
    if finished is None or result.latency_ms is None or finished.trial.latency_ms >= result.latency_ms:
        return
    for trial in result.trials:  # the steps after the one it followed are not part of it
        if trial.chosen and trial.round >= finished.trial.round:
            trial.chosen = False
            trial.reason = (trial.reason + "; " if trial.reason else "") + (
                f"superseded: the search ended with round {finished.trial.round}'s {finished.trial.candidate}")
    finished.trial.chosen = True
    progress(f"search: ending with {' + '.join(finished.applied)} (round {finished.trial.round}, "
             f"{finished.trial.latency_ms:.3f} ms, accuracy {finished.trial.accuracy:.2f}): faster than where the "
             f"rounds ended ({result.latency_ms:.3f} ms), whose structural steps left quantization no accuracy budget")
    result.model, result.applied = finished.model, finished.applied
    result.latency_ms, result.accuracy = finished.trial.latency_ms, finished.trial.accuracy


def _gain(result: SearchResult, latency: float, accuracy: float) -> float:
    return (result.latency_ms - latency) / max(result.accuracy - accuracy, 0.01)


def _measured_trial(candidate: Candidate, round_index: int, result: SearchResult, evaluate: Evaluator,
                    base_accuracy: float, max_accuracy_drop: float, min_gain: float, progress: Progress, done: int, total: int):
    start = time.monotonic()
    try:
        trial_model = candidate.apply(result.model)
        evaluation = evaluate(trial_model)
        latency, method, accuracy = evaluation.latency_ms, evaluation.method, evaluation.accuracy
    except NotFaster as exc:
        trial = Trial(round_index, candidate.name, None, "table", float("nan"), reason=str(exc))
        result.trials.append(trial)
        progress(f"search round {round_index}: {candidate.name}: not built: {exc}", done, total)
        return trial, None
    except HwcError as exc:
        trial = Trial(round_index, candidate.name, None, "failed", float("nan"), reason=str(exc))
        result.trials.append(trial)
        progress(f"search round {round_index}: {candidate.name} failed: {exc}", done, total)
        return trial, None
    trial = Trial(round_index, candidate.name, latency, method, accuracy, kernels_ms=evaluation.kernels_ms,
                  fidelity=evaluation.fidelity)
    _judge(trial, result, base_accuracy, max_accuracy_drop, min_gain)
    result.trials.append(trial)
    progress(f"search round {round_index}: {candidate.name}: {latency:.3f} ms ({method}), accuracy "
             f"{accuracy:.2f} -> {'kept' if trial.accepted else 'rejected: ' + trial.reason} "
             f"[{time.monotonic() - start:.0f} s]", done, total)
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
                  done: int, total: int, deadline: Deadline) -> list[tuple[bool, float, Trial, Any]]:
    """Score the per-layer steps the table predicts to save the most; the rest are recorded as such."""
    proposals, unpriced = steps.propose(result.model, prune=not steps.allocation_due)
    steps.allocation_due = False
    for st in unpriced:
        result.trials.append(Trial(round_index, st.name, None, "table", float("nan"), layers=st.shapes,
                                   reason=f"not priced: the latency table's budget ({steps.table.budget_s:g} s "
                                          f"per run) or the search's ({deadline.budget_s:g} s) was spent first; "
                                          f"a later run continues from the cache"))
    if unpriced:
        progress(f"search round {round_index}: {len(unpriced)} per-layer step(s) not priced (table budget spent)"
                 if not deadline.passed() else
                 f"search round {round_index}: {len(unpriced)} per-layer step(s) not priced (search budget spent)")
    promising = [st for st in proposals if st.saving_share > min_gain][:how_many]
    for st in proposals:
        if st not in promising:
            why = (f"the latency table predicts {st.saving_share:.1%} of the time saved, not {min_gain:.0%}"
                   if st.saving_share <= min_gain else
                   f"the table predicts less saving ({st.saving_share:.1%}) than the {how_many} steps tried")
            result.trials.append(Trial(round_index, st.name, None, "table", float("nan"), reason=why,
                                       predicted_ms=st.predicted_ms(result.latency_ms), layers=st.shapes))
    kept = []
    for index, st in enumerate(promising, done + 1):
        if deadline.passed():
            result.trials.append(deadline.unreached(round_index, st.name, layers=st.shapes,
                                                    predicted_ms=st.predicted_ms(result.latency_ms)))
            continue
        start = time.monotonic()
        predicted = st.predicted_ms(result.latency_ms)
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
        progress(f"search round {round_index}: {st.name}: table predicts {predicted:.3f} ms, "
                 f"accuracy {accuracy:.2f} (ONNX Runtime) -> {'kept' if trial.accepted else 'rejected: ' + trial.reason} "
                 f"[{time.monotonic() - start:.0f} s]", index, total)
    return kept


def _allocation_trial(steps: LayerSteps, round_index: int, result: SearchResult, evaluate: Evaluator,
                      base_accuracy: float, max_accuracy_drop: float, progress, deadline: Deadline
                      ) -> list[tuple[bool, float, Trial, Any]]:
    """Every group's ratio at once, by sensitivity (``allocation``): one more per-layer candidate,
    priced by the table and scored with ONNX Runtime, checked end to end if it wins the round."""
    recipe = steps.prune
    floor = base_accuracy - max_accuracy_drop * recipe.allocation_share
    start = time.monotonic()
    found = allocate(result.model, recipe, steps.target, steps.calibration, steps.table, evaluate.score_ort, floor,
                     progress, lambda: not deadline.passed())
    name = "prune (allocated by sensitivity)"
    result.allocation = {"floor": floor, "share": recipe.allocation_share} | (found.to_dict() if found else {})
    if found is None:
        why = (f"not evaluated: the search's time budget ({deadline.budget_s:g} s) was spent before an allocation "
               f"was built" if deadline.passed() else
               f"no allocation both saves latency (by the table) and keeps the accuracy at or above {floor:.2f}")
        result.trials.append(Trial(round_index, name, None, "table", float("nan"), reason=why))
        progress(f"search round {round_index}: {name}: none within {floor:.2f} [{time.monotonic() - start:.0f} s]")
        return []
    # The table's relative change applied to the measured latency (its sums are on the anchor's scale).
    predicted = result.latency_ms * steps.table.predict_ms(found.model)[0] / steps.table.predict_ms(result.model)[0]
    name = f"prune (allocated by sensitivity: {len(found.ratios)} groups)"
    trial = Trial(round_index, name, None, "table", found.accuracy, predicted_ms=predicted, layers=found.shapes,
                  accepted=True)
    result.trials.append(trial)
    progress(f"search round {round_index}: {name}: table predicts {predicted:.3f} ms, accuracy {found.accuracy:.2f} "
             f"(ONNX Runtime) [{time.monotonic() - start:.0f} s]")
    return [(False, _gain(result, predicted, found.accuracy), trial, found.model)]


def _choose(kept: list[tuple[bool, float, Trial, Any]], result: SearchResult, evaluate: Evaluator,
            base_accuracy: float, max_accuracy_drop: float, min_gain: float, progress) -> bool:
    """Apply the best kept candidate whose end-to-end measurement confirms it; False if none does.

    Structure before precision: a quantized (QDQ) model is not pruned or factorized any further, so
    a quantizing candidate is taken only when no structural one is left (ties: most gain first)."""
    for _, _, trial, model in sorted(kept, key=lambda item: (item[0], -item[1])):
        if trial.latency_ms is None:  # a table prediction: measure the whole compiled model now
            evaluation = evaluate(model)
            latency, method, accuracy = evaluation.latency_ms, evaluation.method, evaluation.accuracy
            trial.latency_ms, trial.latency_method, trial.accuracy = latency, method, accuracy
            trial.kernels_ms, trial.fidelity = evaluation.kernels_ms, evaluation.fidelity
            trial.accepted = False
            _judge(trial, result, base_accuracy, max_accuracy_drop, min_gain)
            progress(f"end-to-end: {trial.candidate}: measured {latency:.3f} ms ({method}) for the table's "
                     f"{trial.predicted_ms:.3f} ms, accuracy {accuracy:.2f} on the compiled model -> "
                     f"{'applied' if trial.accepted else 'rejected: ' + trial.reason}")
            if not trial.accepted:
                trial.reason = "end-to-end check: " + trial.reason
                continue
        trial.chosen = True
        evaluate.adopt(model)
        result.model, result.latency_ms, result.accuracy = model, trial.latency_ms, trial.accuracy
        result.applied.append(trial.candidate)
        return True
    return False
