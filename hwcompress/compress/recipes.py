"""One description per compression family: its knobs (with defaults, schema and help), the values
the search tries, and how to apply it. The profile schema, the profile's typed form, the CLI's
defaults and the search's candidates all come from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import onnx

from ..config.targets import Target
from ..data.calibration import Calibration
from ..passes.prune_channels import IMPORTANCES

_BOOL = {"type": "boolean"}
_RATIO = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
_ENERGY = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
LOWRANK_METHODS = ("svd", "spatial", "tucker2")
SCHEMES = ("int8", "pow2", "float16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def knob(default: Any, schema: dict[str, Any], help: str) -> Any:
    """A recipe field: its default, its JSON schema in a profile, and what it means."""
    return field(default=default, metadata={"schema": schema, "help": help})


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": 1}


class Knobs:
    """Typed knobs read from a YAML mapping; the schema is generated from the fields."""

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "properties": {f.name: f.metadata["schema"] for f in fields(cls)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Knobs":
        values = {}
        for f in fields(cls):
            if f.name in (data or {}):
                value = data[f.name]
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def default(cls, name: str) -> Any:
        f = next(f for f in fields(cls) if f.name == name)
        return f.default if f.default is not MISSING else f.default_factory()


_MULTIPLE = {"type": ["integer", "null"], "minimum": 1}


class StructuralRecipe(Knobs):
    """A family whose search values (``values``: ratios, energies) are each a whole-model candidate
    where the profile does not decide per layer."""

    values: ClassVar[str]
    target_multiple: ClassVar[str]  # the Target field that gives the multiple when the profile does not

    def multiple_for(self, target: Target) -> int:
        """Channel counts (ranks) kept in multiples of this: the profile's ``multiple`` where it sets
        one (a GPU profile with int8 candidates asks 16, what int8 tensor cores take), else the target's."""
        return self.multiple or getattr(target, self.target_multiple)

    def whole_model(self, target: Target, calibration: Calibration | None) -> list[tuple[str, Any]]:
        if not self.enabled or self.per_layer:
            return []
        return [(f"{self.family} {v:g}", lambda m, v=v: self.apply(m, v, target, calibration))
                for v in getattr(self, self.values)]


@dataclass(frozen=True)
class PruneRecipe(StructuralRecipe):
    family: ClassVar[str] = "prune"
    values: ClassVar[str] = "ratios"
    target_multiple: ClassVar[str] = "channel_multiple"
    enabled: bool = knob(False, _BOOL, "a candidate in the search")
    per_layer: bool = knob(False, _BOOL, "steps per group of coupled layers, priced by the latency table "
                                        "(NetAdapt); off: one global ratio per candidate")
    ratios: tuple[float, ...] = knob((0.25,), _array(_RATIO), "fractions of channels removed, each a candidate")
    allocate: bool = knob(False, _BOOL, "with per_layer: first, the ratios of every group at once, allocated by "
                                        "each group's measured output error and the table's latency saved "
                                        "(sensitivity curves), then one group a round")
    allocation_share: float = knob(1.0, {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                   "the part of the accuracy budget the allocation may spend (the rest is "
                                   "left for later rounds: int8)")
    branches: bool = knob(False, _BOOL, "with allocate: also remove a residual branch whole (x + f(x) -> x + its "
                                        "mean on the calibration data, the layers after it refit), as the last "
                                        "point of the sensitivity curve of the group its first layer forms")
    importance: str = knob("reconstruction", {"enum": list(IMPORTANCES)},
                           "how channels are ranked: what their readers lose (needs calibration data; l1 without), "
                           "or the filter L1/L2 norm, or BN gamma")
    reconstruct: bool = knob(True, _BOOL, "least-squares refit of the next layers on calibration data")
    narrow_linear: bool = knob(True, _BOOL, "with reconstruct: a group only linear ops touch (a linear bottleneck's "
                                            "stream) keeps the directions its readers need most, not a subset of "
                                            "its channels")
    multiple: int | None = knob(None, _MULTIPLE, "channels kept in multiples of this (default: the target's "
                                                 "channel_multiple)")

    def apply(self, model: onnx.ModelProto, ratio: float, target: Target, calibration: Calibration | None,
              layer_ratios: dict[str, float] | None = None) -> onnx.ModelProto:
        from .prune import prune_model

        # Statistics matching re-reads every layer after the change: whole-model candidates only
        # (a per-layer step would pay that for each of its many trials).
        return prune_model(model, ratio, self.multiple_for(target), self.importance, layer_ratios,
                           calibration=calibration, reconstruct=self.reconstruct and calibration is not None,
                           match_statistics=layer_ratios is None, narrow_linear=self.narrow_linear)[0]


@dataclass(frozen=True)
class LowrankRecipe(StructuralRecipe):
    family: ClassVar[str] = "lowrank"
    values: ClassVar[str] = "energies"
    target_multiple: ClassVar[str] = "rank_multiple"
    enabled: bool = knob(False, _BOOL, "a candidate in the search")
    per_layer: bool = knob(False, _BOOL, "one layer at a time, priced by the latency table; off: whole model")
    energies: tuple[float, ...] = knob((0.95,), _array(_ENERGY), "singular-value energy kept, each a candidate")
    methods: tuple[str, ...] = knob(LOWRANK_METHODS, _array({"enum": list(LOWRANK_METHODS)}),
                                    "factorizations tried per layer (the cheapest that keeps the energy wins)")
    data_aware: bool = knob(True, _BOOL, "factors fitted to calibration data where a layer allows it")
    multiple: int | None = knob(None, _MULTIPLE, "ranks in multiples of this (default: the target's rank_multiple)")

    def apply(self, model: onnx.ModelProto, energy: float, target: Target, calibration: Calibration | None,
              layers: tuple[str, ...] | None = None) -> onnx.ModelProto:
        from .lowrank import lowrank_model

        return lowrank_model(model, energy, methods=self.methods, multiple=self.multiple_for(target),
                             calibration=calibration if self.data_aware else None, layers=layers,
                             match_statistics=layers is None)[0]


@dataclass(frozen=True)
class QuantizeRecipe(Knobs):
    family: ClassVar[str] = "quantize"
    enabled: bool = knob(False, _BOOL, "a candidate in the search (needs calibration data)")
    per_layer: bool = knob(False, _BOOL, "int8 only in the layers the latency table measures faster")
    schemes: tuple[str, ...] = knob(("int8",), _array({"enum": list(SCHEMES)}),
                                    "int8 QDQ, pow2 weights and/or float16, each a candidate where the target has the dtype")
    calibration: str = knob("percentile", {"enum": list(CALIBRATION_METHODS)}, "activation range calibration")

    def apply(self, model: onnx.ModelProto, scheme: str, target: Target, calibration: Calibration,
              keep_fp32: tuple[str, ...] = (), pow2_layers: tuple[str, ...] = ()) -> onnx.ModelProto:
        from .quantize import quantize_model

        return quantize_model(model, calibration, scheme, self.calibration, target.symmetric_activations,
                              keep_fp32=tuple(keep_fp32), pow2_layers=tuple(pow2_layers))[0]

    def usable_schemes(self, target: Target) -> list[str]:
        return [s for s in self.schemes if s in target.dtypes] if self.enabled else []


RECIPES: dict[str, type[Knobs]] = {r.family: r for r in (PruneRecipe, LowrankRecipe, QuantizeRecipe)}
