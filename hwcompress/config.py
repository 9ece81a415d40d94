"""Targets and profiles: YAML files found on a search path and checked against a schema.

The search path is, first to last: directories given on the command line (``--targets-dir``,
``--profiles-dir``), then those in ``HWC_TARGETS_PATH`` / ``HWC_PROFILES_PATH`` (``os.pathsep``
separated), then the built-in files shipped in the package. The first file that defines a name wins,
so a user can add or override a target or profile by dropping a YAML file in a directory.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .cpu_threads import physical_cores
from .errors import HwcError

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_TVM_TARGET = {"type": "object", "required": ["kind"], "properties": {"kind": {"type": "string"}}}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "description", "tvm", "channel_multiple", "dtypes", "latency"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
        "description": {"type": "string", "minLength": 1},
        "tvm": {
            "type": "object", "required": ["target"], "additionalProperties": False,
            "properties": {"target": _TVM_TARGET, "host": _TVM_TARGET,
                           "cross_compiler": {"type": ["string", "null"]}},
        },
        "channel_multiple": _POSITIVE_INT,
        "rank_multiple": _POSITIVE_INT,
        "dtypes": {"type": "array", "minItems": 1, "uniqueItems": True,
                   "items": {"enum": ["float32", "float16", "int8", "pow2"]}},
        "int8": {"type": "object", "additionalProperties": False, "properties": {
            "activation": {"enum": ["asymmetric", "symmetric"]}, "dot_product": {"type": "boolean"}}},
        "latency": {
            "type": "object", "required": ["method"], "additionalProperties": False,
            "properties": {
                "method": {"enum": ["local", "rpc", "model"]},
                "device": {"type": ["string", "null"], "pattern": r"^rpc://[^/:]+:\d+/.+$"},
                "threads": {"oneOf": [_POSITIVE_INT, {"const": "auto"}]},
                "model": {"type": "object"},
            },
        },
    },
}

_PASS_SWITCH = {"enabled": {"type": "boolean"}}
_RATIO = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
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
        "search": {"type": "object", "additionalProperties": False, "properties": {
            "max_rounds": _POSITIVE_INT, "layer_candidates": _POSITIVE_INT,
            "layer_trials": {"type": "integer", "minimum": 0},
            "table_budget_s": {"type": "number", "minimum": 0}}},
        "passes": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "prune": {"type": "object", "additionalProperties": False, "properties": {
                    **_PASS_SWITCH, "ratios": {"type": "array", "items": _RATIO},
                    "importance": {"enum": ["l1", "l2", "bn_gamma"]}, "reconstruct": {"type": "boolean"},
                    "per_layer": {"type": "boolean"}}},
                "lowrank": {"type": "object", "additionalProperties": False, "properties": {
                    **_PASS_SWITCH, "energies": {"type": "array", "items": {
                        "type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                    "methods": {"type": "array", "items": {"enum": ["svd", "spatial", "tucker2"]}},
                    "data_aware": {"type": "boolean"}, "per_layer": {"type": "boolean"}}},
                "quantize": {"type": "object", "additionalProperties": False, "properties": {
                    **_PASS_SWITCH, "schemes": {"type": "array", "items": {"enum": ["int8", "pow2"]}},
                    "calibration": {"enum": ["minmax", "percentile", "entropy"]},
                    "per_layer": {"type": "boolean"}}},
            },
        },
    },
}

_KINDS = {"target": ("targets", "HWC_TARGETS_PATH", TARGET_SCHEMA),
          "profile": ("profiles", "HWC_PROFILES_PATH", PROFILE_SCHEMA)}


@dataclass(frozen=True)
class Target:
    """A hardware description: how to build for it and how its latency is measured."""

    name: str
    description: str
    tvm: dict[str, Any]
    channel_multiple: int
    rank_multiple: int
    dtypes: tuple[str, ...]
    int8: dict[str, Any]
    latency: dict[str, Any]
    source: Path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> "Target":
        return cls(name=data["name"], description=data["description"], tvm=data["tvm"],
                   channel_multiple=data["channel_multiple"],
                   rank_multiple=data.get("rank_multiple", data["channel_multiple"]),
                   dtypes=tuple(data["dtypes"]), int8=data.get("int8", {}), latency=data["latency"],
                   source=source)

    def tvm_target_dict(self) -> dict[str, Any]:
        """The TVM target as a JSON dict, with ``auto`` values resolved on this machine."""
        target = _resolve_auto(copy.deepcopy(self.tvm["target"]))
        if "host" in self.tvm:
            target["host"] = _resolve_auto(copy.deepcopy(self.tvm["host"]))
        return target

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm_target_dict())


@dataclass(frozen=True)
class Profile:
    """A compression recipe for one target: candidate passes, their knobs, the accuracy budget."""

    name: str
    target: str
    description: str
    passes: dict[str, Any]
    accuracy_budget: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    search: dict[str, Any] = field(default_factory=dict)  # max_rounds, layer_candidates
    calibration: dict[str, Any] = field(default_factory=dict)  # preprocess: how to read image folders


def search_dirs(kind: str, extra: list[str | os.PathLike] | None = None) -> list[Path]:
    folder, env_var, _ = _KINDS[kind]
    dirs = [Path(d) for d in extra or []]
    dirs += [Path(d) for d in os.environ.get(env_var, "").split(os.pathsep) if d]
    for d in dirs:
        if not d.is_dir():
            raise HwcError(f"{kind} directory {d} does not exist")
    return dirs + [_builtin_dir(folder)]


def load_definitions(kind: str, extra: list[str | os.PathLike] | None = None) -> dict[Any, tuple[Path, dict]]:
    """All definitions of ``kind`` on the search path, keyed by name (profiles: (target, name))."""
    _, _, schema = _KINDS[kind]
    found: dict[Any, tuple[Path, dict]] = {}
    for directory in search_dirs(kind, extra):
        for path in sorted(Path(directory).glob("*.yaml")) + sorted(Path(directory).glob("*.yml")):
            data = load_yaml(path, schema, kind)
            key = data["name"] if kind == "target" else (data["target"], data["name"])
            found.setdefault(key, (path, data))
    return found


def load_yaml(path: Path, schema: dict[str, Any], kind: str) -> dict[str, Any]:
    """Parse and validate one file; any problem is one line naming the file and the field."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise HwcError(f"{path}:{line} not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    except OSError as exc:
        raise HwcError(f"{path}: cannot read: {exc.strerror}") from exc
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        field_path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise HwcError(f"{path}: invalid {kind} file: {field_path}: {error.message}")
    return data


def get_target(name: str, extra_dirs: list | None = None) -> Target:
    targets = load_definitions("target", extra_dirs)
    if name not in targets:
        raise HwcError(f"unknown target {name!r}; known targets: {', '.join(sorted(targets))} "
                       f"(add one with --targets-dir or HWC_TARGETS_PATH)")
    path, data = targets[name]
    return Target.from_dict(data, path)


def list_targets(extra_dirs: list | None = None) -> list[Target]:
    return [Target.from_dict(d, p) for _, (p, d) in sorted(load_definitions("target", extra_dirs).items())]


def get_profile(target: str, name: str = "default", extra_dirs: list | None = None) -> Profile:
    profiles = load_definitions("profile", extra_dirs)
    if (target, name) not in profiles:
        known = sorted(n for t, n in profiles if t == target)
        raise HwcError(f"no profile {name!r} for target {target!r}; profiles for it: "
                       f"{', '.join(known) or 'none'} (add one with --profiles-dir or HWC_PROFILES_PATH)")
    path, data = profiles[(target, name)]
    return Profile(name=data["name"], target=data["target"], description=data.get("description", ""),
                   passes=data["passes"], accuracy_budget=data.get("accuracy_budget", {}), source=path,
                   search=data.get("search", {}), calibration=data.get("calibration", {}))


def _builtin_dir(folder: str) -> Path:
    """Built-in YAMLs: inside an installed wheel, or beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    installed = package / folder
    return installed if installed.is_dir() else package.parent / folder


def _resolve_auto(target: dict[str, Any]) -> dict[str, Any]:
    if target.get("mcpu") == "auto":
        import tvm

        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    if target.get("num-cores") == "auto":
        target["num-cores"] = physical_cores()
    return target
