"""Profiles: a compression recipe for one target (which families are candidates, their knobs, the
accuracy budget, search settings), read from YAML into typed objects whose schema comes from the
recipes (``compress.recipes``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.files import Kind, load_definitions
from ..errors import HwcError
from .recipes import RECIPES, Knobs, LowrankRecipe, PruneRecipe, QuantizeRecipe, knob

_POSITIVE_INT = {"type": "integer", "minimum": 1}


@dataclass(frozen=True)
class SearchSettings(Knobs):
    max_rounds: int = knob(3, _POSITIVE_INT, "rounds of the greedy search")
    layer_candidates: int = knob(4, _POSITIVE_INT, "per-layer steps scored per round (most saving first)")
    layer_trials: int = knob(0, {"type": "integer", "minimum": 0},
                             "tuning trials per layer of the latency table (0: the project's own kernels and "
                             "default schedules, which need no tuning)")
    table_budget_s: float = knob(1200, {"type": "number", "minimum": 0},
                                 "seconds per run for timing layer shapes beyond the model's own")
    budget_s: float = knob(600, {"type": "number", "exclusiveMinimum": 0},
                           "wall-time budget of the search (s): when spent, no new candidate is built or priced "
                           "and the report lists what was left (the final compile's tuning comes after)")


PROFILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "target", "passes"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
        "target": {"type": "string"},
        "description": {"type": "string"},
        "accuracy_budget": {"type": "object", "additionalProperties": False, "properties": {
            "max_top1_drop": {"type": "number", "minimum": 0}}},
        "calibration": {"type": "object", "additionalProperties": False, "properties": {
            "preprocess": {"type": "string"}}},
        "search": SearchSettings.schema(),
        "passes": {"type": "object", "additionalProperties": False,
                   "properties": {family: recipe.schema() for family, recipe in RECIPES.items()}},
    },
}

PROFILES = Kind("profile", "profiles", "HWC_PROFILES_PATH", PROFILE_SCHEMA, lambda d: (d["target"], d["name"]))
DEFAULT_MAX_ACCURACY_DROP = 1.0


@dataclass(frozen=True)
class Profile:
    """A compression recipe for one target: candidate families, their knobs, the accuracy budget."""

    name: str
    target: str
    description: str = ""
    prune: PruneRecipe = field(default_factory=PruneRecipe)
    lowrank: LowrankRecipe = field(default_factory=LowrankRecipe)
    quantize: QuantizeRecipe = field(default_factory=QuantizeRecipe)
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    search: SearchSettings = field(default_factory=SearchSettings)
    preprocess: str | None = None  # how to read image folders given as calibration/validation data
    source: Path | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | None = None) -> "Profile":
        passes = data.get("passes", {})
        return cls(name=data["name"], target=data["target"], description=data.get("description", ""),
                   prune=PruneRecipe.from_dict(passes.get("prune")),
                   lowrank=LowrankRecipe.from_dict(passes.get("lowrank")),
                   quantize=QuantizeRecipe.from_dict(passes.get("quantize")),
                   max_accuracy_drop=data.get("accuracy_budget", {}).get("max_top1_drop", DEFAULT_MAX_ACCURACY_DROP),
                   search=SearchSettings.from_dict(data.get("search")),
                   preprocess=data.get("calibration", {}).get("preprocess"), source=source)

    @property
    def recipes(self) -> list[Knobs]:
        return [self.prune, self.lowrank, self.quantize]

    @property
    def per_layer(self) -> bool:
        """Whether any enabled family is decided per layer (the search then needs a latency table)."""
        return any(r.enabled and r.per_layer for r in self.recipes)


def get_profile(target: str, name: str = "default", extra_dirs: list | None = None) -> Profile:
    profiles = load_definitions(PROFILES, extra_dirs)
    if (target, name) not in profiles:
        known = sorted(n for t, n in profiles if t == target)
        raise HwcError(f"no profile {name!r} for target {target!r}; profiles for it: "
                       f"{', '.join(known) or 'none'} (add one with --profiles-dir or HWC_PROFILES_PATH)")
    path, data = profiles[(target, name)]
    return Profile.from_dict(data, path)
