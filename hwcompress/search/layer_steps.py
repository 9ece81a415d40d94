"""Per-layer steps (NetAdapt): prune one group of coupled layers by a step, or factorize one layer,
each priced by the latency table before anything is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from ..compress.profile import Profile
from ..config.targets import Target
from ..data.calibration import Calibration
from ..errors import HwcError
from ..model.graph import Graph
from ..passes import prune_channels
from ..passes.base import PassResult
from ..passes.channel_groups import analyze
from ..passes.lowrank import lowrank
from .layer_spec import model_layers


@dataclass
class LayerStep:
    """One per-layer rewrite (prune a group of coupled layers by a step, or factorize one layer),
    with the latency table's prediction of what it saves."""

    name: str
    apply: Callable[[onnx.ModelProto], onnx.ModelProto]  # the full rewrite (reconstruction, data-aware)
    shapes: dict[str, list[int]]  # pruning: layer -> [channels before, after]; low-rank: layer -> ranks
    # The part of the model's time it saves: the table's saving over the sum of the model's layers
    # (None: not priced, the table's budget ran out before its shapes). The sum is on the table's
    # anchor scale and its layers run alone, so a prediction is this share of the measured latency,
    # not the measured latency less the table's milliseconds.
    saving_share: float | None = None

    def predicted_ms(self, latency_ms: float) -> float:
        """The latency the table predicts once applied to a model measured at ``latency_ms``."""
        return latency_ms * (1 - self.saving_share)


class LayerSteps:
    """Per-layer candidates of the current model, ranked by the latency table.

    Every step is first applied cheaply (no reconstruction) to learn the layer shapes it leaves;
    the table prices those shapes, so pruning and factorization are compared on one scale."""

    def __init__(self, profile: Profile, target: Target, table, calibration: Calibration | None):
        self.prune, self.lowrank = profile.prune, profile.lowrank
        self.target, self.table, self.calibration = target, table, calibration
        # Pruning by sensitivity allocation: once, in the first structural round, instead of that
        # round's one-group steps (``allocation``).
        self.allocation_due = bool(self.prune.enabled and self.prune.per_layer and self.prune.allocate
                                   and calibration is not None)

    def propose(self, model: onnx.ModelProto, prune: bool = True) -> tuple[list[LayerStep], list[LayerStep]]:
        """The priced steps, most saving first, and those the table's budget left unpriced.

        Steps are priced in order of multiply-accumulates removed, so a budget spends itself on the
        steps most likely to matter; the decision itself is the table's latency, never the MACs."""
        current, _ = self.table.predict_ms(model)
        steps = []
        if prune and self.prune.enabled and self.prune.per_layer:
            steps += self._prune_steps(model)
        if self.lowrank.enabled and self.lowrank.per_layer:
            steps += self._lowrank_steps(model)
        previews = [(step, model_layers(preview)) for step, preview in steps]
        previews.sort(key=lambda item: sum(spec.macs for spec in item[1].values()))
        priced, unpriced = [], []
        for step, layers in previews:
            predicted = self.table.predict_layers_ms(layers)
            if predicted is None:
                unpriced.append(step)
            else:
                step.saving_share = (current - predicted) / current
                priced.append(step)
        return sorted(priced, key=lambda st: -st.saving_share), unpriced

    def _prune_steps(self, model: onnx.ModelProto) -> list[tuple[LayerStep, onnx.ModelProto]]:
        found: dict[tuple, tuple[LayerStep, onnx.ModelProto]] = {}
        multiple = self.prune.multiple_for(self.target)
        for group in analyze(Graph(model)).coupled_layers():
            for ratio in self.prune.ratios:
                ratios = {node: ratio for node in group}
                applied = prune_preview(model, ratios, multiple)
                if applied is None:
                    continue
                shapes = changed_shapes(applied.log.details["layers"])
                key = tuple(sorted((n, a) for n, (_, a) in shapes.items()))
                if key and key not in found:
                    first = group_label(group)
                    before, after = shapes.get(group[0], next(iter(shapes.values())))
                    apply = (lambda m, r=ratios: self.prune.apply(m, 0.0, self.target, self.calibration, layer_ratios=r))
                    found[key] = (LayerStep(f"prune {first} {before}->{after}", apply, shapes), applied.model)
        return list(found.values())

    def _lowrank_steps(self, model: onnx.ModelProto) -> list[tuple[LayerStep, onnx.ModelProto]]:
        found = []
        knobs = dict(methods=self.lowrank.methods, multiple=self.lowrank.multiple_for(self.target))
        for name in model_layer_names(model):
            for energy in self.lowrank.energies:
                applied = lowrank.apply(model, energy=energy, layers=(name,), **knobs)
                done = applied.log.details["layers"].get(name)
                if not done:
                    continue  # no method saves enough here
                apply = (lambda m, e=energy, n=name: self.lowrank.apply(m, e, self.target, self.calibration, layers=(n,)))
                label = f"lowrank {name} {done['method']} rank {'x'.join(map(str, done['ranks']))} (energy {energy:g})"
                found.append((LayerStep(label, apply, {name: list(done["ranks"])}), applied.model))
        return found


def prune_preview(model: onnx.ModelProto, layer_ratios: dict[str, float], multiple: int) -> PassResult | None:
    """The pruning pass alone (no ranking data, no refit): the layer shapes a step leaves; None
    where it removes nothing (at the channel multiple)."""
    try:
        return prune_channels.apply(model, ratio=0.0, layer_ratios=layer_ratios, multiple=multiple)
    except HwcError:
        return None


def changed_shapes(layers: dict[str, dict]) -> dict[str, list[int]]:
    """Layer -> [channels before, after], for the layers the pruning pass's log says changed."""
    return {n: [v["before"], v["after"]] for n, v in layers.items() if v["before"] != v["after"]}


def group_label(group: list[str]) -> str:
    """A group of coupled layers by its first layer."""
    return group[0] + (f" (+{len(group) - 1} coupled)" if len(group) > 1 else "")


def model_layer_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
