"""Pruning ratios allocated across all groups of coupled layers at once, by sensitivity.

NetAdapt prunes one group a round, and a round costs an end-to-end build and measurement; the
accuracy budget goes to whichever single step looks best first. Here each group is pruned alone at
each of the profile's ratios (channels ranked and the readers refit, as the final model will be)
and its output error on held-out calibration samples measured: the group's **sensitivity curve**.
The latency table prices the layer shapes each point leaves. Squared output errors of different
groups add (MobileNetV2, 64 ImageNet calibration images: sums predicting 0.099 / 0.196 / 0.282 for
combinations that measured 0.102 / 0.181 / 0.272), so the best allocation for a total error is the
greedy solution of a separable knapsack: every curve's upper concave hull in (squared error,
latency saved), its segments taken in order of latency saved per error added. How much error the
accuracy budget allows is not known from the curves; it is found by bisection over that order,
each probe built whole (refit and statistics matching) and scored with the search's metric, and the
steps after the longest good prefix are then tried one at a time, a step that breaks the floor
passed over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from ..compress.channel_importance import input_channel_scores
from ..compress.fidelity import split_feeds
from ..compress.prune import prune_model
from ..compress.recipes import PruneRecipe
from ..config.targets import Target
from ..data.calibration import Calibration
from ..model.graph import Graph
from ..passes.channel_groups import analyze
from ..passes.residual_branches import Branch, leads_branches, residual_branches
from .layer_spec import model_layers
from .layer_steps import changed_shapes, group_label, prune_preview

MAX_PROBES = 6  # whole builds in the bisection: 2^6 covers MobileNetV2's ~50 hull segments
WALK_PROBES = 12  # whole builds trying the steps after it one at a time (~20 s each on MobileNetV2)


@dataclass
class Point:
    """One group pruned alone at one ratio."""

    ratio: float
    error2: float  # squared relative output error on held-out calibration samples, after the refit
    saving_ms: float  # the latency table's prediction of what it saves


@dataclass
class Curve:
    group: list[str]
    points: list[Point] = field(default_factory=list)  # by ratio; the unpruned (0, 0, 0) implied

    def hull(self) -> list[tuple[Point, float, float]]:
        """The upper concave hull from the unpruned point: (point, error added, saving added) per
        segment, slopes falling, so a prefix of the merged order is a valid choice per group."""
        segments, here = [], Point(0.0, 0.0, 0.0)
        rest = [p for p in self.points if p.saving_ms > 0]
        while True:
            ahead = [p for p in rest if p.ratio > here.ratio and p.saving_ms > here.saving_ms]
            if not ahead:
                return segments
            best = max(ahead, key=lambda p: (p.saving_ms - here.saving_ms) / max(p.error2 - here.error2, 1e-12))
            segments.append((best, best.error2 - here.error2, best.saving_ms - here.saving_ms))
            here = best


@dataclass
class Allocation:
    """The allocation found: the model, its per-layer ratios and what it cost to find."""

    model: onnx.ModelProto
    ratios: dict[str, float]  # group (its first layer) -> ratio
    shapes: dict[str, list[int]]  # layer -> [channels before, after]
    accuracy: float
    predicted_error: float
    narrowed: list[str]  # groups (their first layer) narrowed in a basis rather than pruned (``linear_groups``)
    probes: list[dict]
    curves: list[Curve]
    unpriced: int

    def to_dict(self) -> dict:
        return {"chosen": self.ratios, "narrowed": self.narrowed,
                "predicted_output_error": round(self.predicted_error, 4),
                "accuracy": self.accuracy, "probes": self.probes, "unpriced_points": self.unpriced,
                "curves": [{"group": c.group, "points": [{"ratio": p.ratio, "output_error": round(p.error2 ** 0.5, 4),
                                                          "saving_ms": round(p.saving_ms, 4)} for p in c.points]}
                           for c in self.curves]}


def allocate(model: onnx.ModelProto, recipe: PruneRecipe, target: Target, calibration: Calibration, table,
             score: Callable[[onnx.ModelProto], float], floor: float, progress,
             time_left: Callable[[], bool]) -> Allocation | None:
    """The most latency-saving allocation of ``recipe.ratios`` over the model's groups whose
    ``score`` stays at or above ``floor``; None where no group saves anything within it."""
    multiple = recipe.multiple_for(target)
    fit = split_feeds(calibration)[0]
    started = time.monotonic()
    scores = input_channel_scores(model, fit) if recipe.importance == "reconstruction" else None
    progress(f"allocation: channels ranked on {len(fit)} calibration samples [{time.monotonic() - started:.0f} s]")
    current, _ = table.predict_ms(model)
    graph = Graph(model)
    groups, branches = analyze(graph).coupled_layers(), residual_branches(graph)
    curves, unpriced = [], 0
    for index, group in enumerate(groups, 1):
        if not time_left():
            progress(f"allocation: time budget spent; {len(groups) - index + 1} group(s) left without a curve")
            break
        curve = Curve(group)
        for ratio in group_ratios(recipe, group, branches):
            layer_ratios = dict.fromkeys(group, ratio)
            preview = prune_preview(model, layer_ratios, multiple)
            if preview is None:
                continue
            predicted = table.predict_layers_ms(model_layers(preview.model))
            if predicted is None:
                unpriced += 1
                continue
            _, report = _prune(model, recipe, multiple, layer_ratios, calibration, scores, match_statistics=False)
            curve.points.append(Point(ratio, report["output_error"] ** 2, current - predicted))
        curves.append(curve)
        described = ", ".join(f"{p.ratio:g}: error {p.error2 ** 0.5:.3f}, {p.saving_ms:+.3f} ms" for p in curve.points)
        progress(f"allocation: sensitivity of {group_label(group)}: {described or 'no step'}", index, len(groups))
    order = merged_order(curves)
    if not order:
        return None
    return _bisect(model, recipe, multiple, calibration, scores, order, curves, unpriced, score, floor, progress,
                   time_left)


def group_ratios(recipe: PruneRecipe, group: list[str], branches: list[Branch]) -> list[float]:
    """The profile's ratios for a group of coupled layers, and 1 (its residual branch removed) where
    the profile removes branches and the group is the one a branch's first layer forms. Only here,
    where each point's error is measured: a one-group step is chosen by latency saved alone, and
    removed MobileNetV2 blocks, the steps saving most, cost 6-11 points as such steps."""
    ratios = list(recipe.ratios)
    if recipe.branches and leads_branches(group, branches):
        ratios.append(1.0)
    return ratios


def merged_order(curves: list[Curve]) -> list[tuple[Point, Curve, float, float]]:
    """Every curve's hull segments, most latency saved per squared error added first: (point,
    curve, error added, saving added). Along one curve slopes fall, so any prefix takes each
    group's segments in order, and the group's ratio is that of its last segment taken."""
    return sorted(((point, curve, error, saving) for curve in curves for point, error, saving in curve.hull()),
                  key=lambda s: -s[3] / max(s[2], 1e-12))


def _bisect(model, recipe, multiple, calibration, scores, order, curves, unpriced, score, floor, progress,
            time_left) -> Allocation | None:
    """The longest prefix of ``order`` whose whole build scores at or above ``floor`` (the score
    taken to fall as steps are added; at most ``MAX_PROBES`` builds), then the steps after it tried
    one at a time (``_walk``)."""
    good, lo, hi, probes = None, 0, len(order), []

    def probe(steps: list[int]) -> bool:
        nonlocal good
        chosen = _choice([order[i] for i in steps])
        layer_ratios = {layer: ratio for group, ratio in chosen.items() for layer in _group(curves, group)}
        started = time.monotonic()
        built, report = _prune(model, recipe, multiple, layer_ratios, calibration, scores, match_statistics=True)
        accuracy = score(built)
        predicted = sum(order[i][2] for i in steps) ** 0.5
        probes.append({"steps": len(steps), "groups": len(chosen), "predicted_error": round(predicted, 4),
                       "accuracy": accuracy})
        progress(f"allocation: {len(steps)} of {len(order)} steps ({len(chosen)} groups, predicted output error "
                 f"{predicted:.3f}): accuracy {accuracy:.2f} (floor {floor:.2f}) [{time.monotonic() - started:.0f} s]")
        if accuracy >= floor:
            good = (built, chosen, changed_shapes(report["pruning"]["layers"]), accuracy, predicted,
                    report.get("narrowed", []))
        return accuracy >= floor

    while lo < hi and len(probes) < MAX_PROBES and time_left():
        k = (lo + hi + 1) // 2
        if probe(list(range(k))):
            lo = k
        else:
            hi = k - 1
    if good is None:
        return None
    _walk(order, lo, probe, time_left, known_bad=lo == hi and lo < len(order))
    return Allocation(*good, probes=probes, curves=curves, unpriced=unpriced)


def _walk(order, taken: int, probe: Callable[[list[int]], bool], time_left, known_bad: bool = False) -> None:
    """After the longest good prefix of ``taken`` steps, each later step is tried on top of the
    steps kept so far and kept where the build still scores at or above the floor; a group whose
    step failed is passed over after it (its later steps build on that one). The score is a count
    of samples: one step that costs two images of 186 (MobileNetV2: the stem's quarter) had ended
    the allocation at 3 groups, where walking past it kept 7 within the same budget (at most
    ``WALK_PROBES`` builds). ``known_bad``: the bisection built the next step already, and it failed."""
    kept, failed_groups, tries = list(range(taken)), set(), 0
    if known_bad:
        failed_groups.add(order[taken][1].group[0])
    for index in range(taken + known_bad, len(order)):
        if tries >= WALK_PROBES or not time_left():
            return
        group = order[index][1].group[0]
        if group in failed_groups:
            continue
        tries += 1
        if probe(kept + [index]):
            kept.append(index)
        else:
            failed_groups.add(group)


def _choice(steps) -> dict[str, float]:
    """Group (its first layer) -> ratio after taking these hull segments (the last one per group)."""
    chosen: dict[str, float] = {}
    for point, curve, _, _ in steps:
        chosen[curve.group[0]] = point.ratio
    return chosen


def _group(curves: list[Curve], first: str) -> list[str]:
    return next(c.group for c in curves if c.group[0] == first)


def _prune(model, recipe: PruneRecipe, multiple: int, layer_ratios, calibration, scores, match_statistics: bool):
    return prune_model(model, 0.0, multiple, recipe.importance, layer_ratios, calibration=calibration,
                       reconstruct=recipe.reconstruct, match_statistics=match_statistics, input_scores=scores,
                       narrow_linear=recipe.narrow_linear)
