"""Targets: what hardware is, how to build for it, how its latency is obtained; read from YAML
(``config.files``) into typed objects, so that no other module reads a target's raw dict."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HwcError
from .files import Kind, load_definitions
from .host import physical_cores

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_MULTIPLE = {"oneOf": [_POSITIVE_INT, {"const": "auto"}]}  # auto: a CPU's vector lanes (float32)
_TVM_TARGET = {"type": "object", "required": ["kind"], "properties": {
    "kind": {"type": "string"}, "mtriple": {"type": "string", "minLength": 1},
    "num-cores": {"oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}}}
_CYCLE_MODEL = {
    "type": "object", "required": ["mac_array", "clock_mhz", "bytes_per_cycle", "layer_overhead_cycles"],
    "additionalProperties": False,
    "properties": {
        "mac_array": {"type": "array", "items": _POSITIVE_INT, "minItems": 2, "maxItems": 2},
        "clock_mhz": {"type": "number", "exclusiveMinimum": 0},
        "bytes_per_cycle": {"type": "number", "exclusiveMinimum": 0},
        "layer_overhead_cycles": {"type": "integer", "minimum": 0},
        "weight_bits": {"type": "object", "additionalProperties": _POSITIVE_INT},
    },
}

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
        "channel_multiple": _MULTIPLE,
        "rank_multiple": _MULTIPLE,
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
                "model": _CYCLE_MODEL,
            },
        },
    },
}

TARGETS = Kind("target", "targets", "HWC_TARGETS_PATH", TARGET_SCHEMA, lambda data: data["name"])
GPU_KINDS = ("cuda", "rocm", "vulkan", "metal", "opencl")


@dataclass(frozen=True)
class CycleModel:
    """A device-less target's latency model (see ``measure.cycle_model``)."""

    mac_array: tuple[int, int]
    clock_mhz: float
    bytes_per_cycle: float
    layer_overhead_cycles: int
    weight_bits: dict[str, int] = field(default_factory=dict)

    def bits(self, weights: str) -> int:
        return self.weight_bits.get(weights, 8)


@dataclass(frozen=True)
class LatencySpec:
    """How the target's latency is obtained: ``local``, ``rpc`` (``device``) or a cycle ``model``."""

    method: str
    device: str | None = None
    threads: int | None = None  # None: every physical core of this machine ("auto")
    model: CycleModel | None = None


@dataclass(frozen=True)
class Target:
    """A hardware description: how to build for it and how its latency is measured."""

    name: str
    description: str
    tvm_target_spec: dict[str, Any]      # the TVM target as written, ``auto`` values unresolved
    tvm_host_spec: dict[str, Any] | None
    cross_compiler: str | None
    channel_multiple_spec: int | str     # as written: a number, or "auto"
    rank_multiple_spec: int | str
    dtypes: tuple[str, ...]
    int8_activation: str                 # "asymmetric" (uint8) or "symmetric" (int8)
    int8_dot_product: bool | None        # None: not stated in the YAML
    latency: LatencySpec
    source: Path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> "Target":
        latency = data["latency"]
        threads = latency.get("threads", "auto")
        model = latency.get("model")
        if latency["method"] == "model" and not model:
            raise HwcError(f"{source}: invalid target file: latency.model: method 'model' needs a cycle model")
        int8 = data.get("int8", {})
        for key in ("channel_multiple", "rank_multiple"):
            if data.get(key) == "auto" and data["tvm"]["target"]["kind"] != "llvm":
                raise HwcError(f"{source}: invalid target file: {key}: 'auto' (the vector lanes) is for CPU "
                               f"targets (tvm.target.kind llvm); give a number")
        return cls(
            name=data["name"], description=data["description"], tvm_target_spec=data["tvm"]["target"],
            tvm_host_spec=data["tvm"].get("host"), cross_compiler=data["tvm"].get("cross_compiler"),
            channel_multiple_spec=data["channel_multiple"],
            rank_multiple_spec=data.get("rank_multiple", data["channel_multiple"]), dtypes=tuple(data["dtypes"]),
            int8_activation=int8.get("activation", "asymmetric"), int8_dot_product=int8.get("dot_product"),
            latency=LatencySpec(method=latency["method"], device=latency.get("device"),
                                threads=None if threads == "auto" else int(threads),
                                model=None if not model else CycleModel(
                                    mac_array=tuple(model["mac_array"]), clock_mhz=model["clock_mhz"],
                                    bytes_per_cycle=model["bytes_per_cycle"],
                                    layer_overhead_cycles=model["layer_overhead_cycles"],
                                    weight_bits=dict(model.get("weight_bits", {})))),
            source=source)

    @property
    def kind(self) -> str:
        """TVM's target kind: llvm, cuda, ..."""
        return self.tvm_target_spec["kind"]

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @property
    def is_cross(self) -> bool:
        """Code for another machine: it can only run (and so be tuned) on that machine."""
        return bool(self.cross_compiler) or self.is_gpu

    @property
    def hardware_found(self) -> str | None:
        """The device this machine has, where the target is defined by it (``arch: auto``): what the
        report names, so that a GPU is labelled as itself."""
        if self.kind == "cuda" and self.tvm_target_spec.get("arch") == "auto":
            gpu = gpu_here()
            return f"{gpu.name} ({gpu.arch})"
        return None

    @property
    def channel_multiple(self) -> int:
        """Channels a pruned layer keeps come in multiples of this. ``auto``: the CPU's float32 vector
        lanes (16 with AVX-512, 8 with AVX2, 4 on NEON): the conv kernels tile output channels by
        whole vectors and fall back to narrower ones otherwise, so MobileNetV2's 144-channel
        expansion pruned to 108 ran 3-7 % slower than unpruned, to 96 4-12 % faster."""
        return self._resolved(self.channel_multiple_spec)

    @property
    def rank_multiple(self) -> int:
        """Ranks of a factorized layer (the first factor's output channels) come in multiples of this."""
        return self._resolved(self.rank_multiple_spec)

    def _resolved(self, multiple: int | str) -> int:
        if multiple != "auto":
            return int(multiple)
        from .vector_unit import VectorUnit

        return VectorUnit.of(self.tvm_target()).lanes

    @property
    def symmetric_activations(self) -> bool:
        return self.int8_activation == "symmetric"

    @property
    def threads(self) -> int | None:
        """Threads a local measurement uses (resolved on this machine); None where it is not local."""
        if self.latency.method != "local":
            return None
        return self.latency.threads or physical_cores()

    def tvm_target_dict(self) -> dict[str, Any]:
        """The TVM target as a JSON dict, with ``auto`` values resolved on this machine."""
        target = _resolve_auto(copy.deepcopy(self.tvm_target_spec))
        if self.tvm_host_spec is not None:
            target["host"] = _resolve_auto(copy.deepcopy(self.tvm_host_spec))
        return target

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm_target_dict())


def get_target(name: str, extra_dirs: list | None = None) -> Target:
    targets = load_definitions(TARGETS, extra_dirs)
    if name not in targets:
        raise HwcError(f"unknown target {name!r}; known targets: {', '.join(sorted(targets))} "
                       f"(add one with --targets-dir or HWC_TARGETS_PATH)")
    path, data = targets[name]
    target = Target.from_dict(data, path)
    check_tvm_target(target)
    return target


def check_tvm_target(target: Target) -> None:
    """What TVM would crash on or refuse later, as one line naming the file: an unknown target kind,
    an LLVM triple for an architecture this LLVM cannot generate code for."""
    import tvm

    for where, spec in (("tvm.target", target.tvm_target_spec), ("tvm.host", target.tvm_host_spec)):
        if spec is None:
            continue
        kinds = list(tvm.target.Target.list_kinds())
        if spec["kind"] not in kinds:
            raise HwcError(f"{target.source}: invalid target file: {where}.kind: unknown TVM target kind "
                           f"{spec['kind']!r}; TVM knows {', '.join(sorted(kinds))}")
        triple = spec.get("mtriple")
        if triple and spec["kind"] == "llvm":
            arch = triple.split("-")[0]
            known = set(tvm.target.codegen.llvm_get_targets()) | {"x86_64", "i686", "i386"}
            if arch not in known and arch.replace("_", "-") not in known:
                raise HwcError(f"{target.source}: invalid target file: {where}.mtriple: {triple!r} names an "
                               f"architecture ({arch}) this TVM's LLVM cannot generate code for")


def list_targets(extra_dirs: list | None = None) -> list[Target]:
    return [Target.from_dict(d, p) for _, (p, d) in sorted(load_definitions(TARGETS, extra_dirs).items())]


def _resolve_auto(target: dict[str, Any]) -> dict[str, Any]:
    if target.get("kind") == "cuda" and target.get("arch") == "auto":
        target.update(gpu_here().target_attrs())
    if target.get("mcpu") == "auto":
        import tvm

        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    if target.get("num-cores") == "auto":
        target["num-cores"] = physical_cores()
    return target


def gpu_here():
    """The CUDA GPU of this machine, for a target whose ``arch`` is ``auto``; none is one clear error."""
    from .gpu import gpu_found

    gpu = gpu_found()
    if gpu is None:
        raise HwcError("this target takes its CUDA arch from the GPU on this machine (arch: auto), and no NVIDIA "
                       "GPU with a driver was found here; build for a named GPU (-t nvidia-t4) or give the arch "
                       "in a target file (tvm.target.arch: sm_XY)")
    return gpu
