"""The search's candidates: the profile's whole-model passes, each from its family's recipe, with
int8 and pow2 decided per layer by the latency table where the profile asks for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from ..compress.profile import Profile
from ..config.targets import Target
from ..data.calibration import Calibration
from ..errors import HwcError
from ..model.graph import Graph
from ..passes.quantize import quantizable_layers
from .layer_spec import model_layers


@dataclass
class Candidate:
    name: str
    family: str  # one candidate per family is applied (a second prune of a pruned model is another round)
    apply: Callable[[onnx.ModelProto], onnx.ModelProto]


class NotFaster(HwcError):
    """The latency table predicts no saving: the candidate is not built (a decision, not a failure)."""


def _faster_forms(model: onnx.ModelProto, table, reference: Callable, candidate: Callable,
                  min_gain: float) -> tuple[list[str], list[str]]:
    """The quantizable layers, and those whose ``candidate`` form the latency table prices at least
    ``min_gain`` faster than their ``reference`` form. Candidate forms are timed within the table's
    budget, biggest layers first; a layer left without a figure counts as not faster."""
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
    found = [Candidate(name, recipe.family, apply)
             for recipe in (profile.prune, profile.lowrank) for name, apply in recipe.whole_model(target, calibration)]
    quantize = profile.quantize
    if calibration is None:
        return found
    symmetric = target.symmetric_activations
    per_layer = table is not None and quantize.per_layer
    schemes = quantize.usable_schemes(target)
    for scheme in schemes:
        def apply(m, s=scheme):
            keep = int8_layers_to_keep_fp32(m, table, symmetric) if per_layer and s == "int8" else ()
            return quantize.apply(m, s, target, calibration, keep_fp32=tuple(keep))
        found.append(Candidate(scheme + (" (per layer)" if per_layer and scheme == "int8" else ""), "quantize", apply))
    if per_layer and {"int8", "pow2"} <= set(schemes):
        def mixed(m):  # int8, with pow2 weights where the table prices them faster
            return quantize.apply(m, "int8", target, calibration, pow2_layers=tuple(pow2_layers_faster(m, table, symmetric)))
        found.append(Candidate("int8 + pow2 (per layer)", "quantize", mixed))
    return found
