"""Per-layer latency tables (NetAdapt): each layer shape compiled alone for the target and timed there.

A layer is a Conv, Gemm or MatMul with constant weights, identified by a ``LayerSpec``: op type,
attributes, input and weight shapes, bias, dtype, and the elementwise ops that TVM fuses into it
(a constant bias Add, Relu, Clip, a residual Add). With that epilogue the one-layer model compiles to the very kernel
TVM builds for the layer inside the whole model, so tuning the table tunes the model too. Its latency is that of a one-layer model built by
TVM for the target (tuned with the table's trial budget into the target's tuning database) and
measured the way the target is measured: on this machine, on a device through the RPC tracker
(every missing layer of a batch in parallel over the device's servers), or with the target's cycle
model. Figures are cached in one file per (target, TVM version, measuring method), keyed by the
spec and the tuning budget, and written after each new figure, so a second search and other models
with the same layers reuse them, and an interrupted fill resumes.

The table predicts a model's latency change as the sum of its layers' changes; the search checks
every prediction it acts on against an end-to-end measurement of the whole compiled model.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import Target, physical_cores
from .errors import HwcError
from .graph import Graph
from .measure import Latency, LocalMeasurer, MeasurementCache
from .summary import layer_macs

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerSpec:
    """What determines a layer's latency on a target (not its weights' values)."""

    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    attributes: tuple[tuple[str, Any], ...]
    bias: bool
    epilogue: tuple[tuple, ...] = ()  # ("Relu",), ("Clip",), ("Add",): residual R, ("AddConst", shape)
    dtype: str = "float32"  # or "int8/uint8", "int8/int8": int8 QDQ with that activation type, lowered;
    # or "pow2": power-of-two weights (a float layer to TVM; 4-bit codes to a cycle model)
    # The bounds of each Clip: not part of the entry (they do not change latency), but the one-layer
    # model keeps them, so its kernel is the model's own one and reuses the model's tuning records.
    clip_bounds: tuple[tuple[float, float], ...] = field(default=(), compare=False)
    # Multiply-accumulates: only the order in which a budgeted table times shapes, never a price.
    macs: int = field(default=0, compare=False)

    def as_int8(self, symmetric_activations: bool) -> "LayerSpec":
        """The same layer quantized as the int8 pass would (per-channel weights, per-tensor input)."""
        return replace(self, dtype="int8/int8" if symmetric_activations else "int8/uint8")

    def as_pow2(self) -> "LayerSpec":
        return replace(self, dtype="pow2")

    def key(self) -> str:
        return json.dumps([self.op, self.input_shape, self.weight_shape, self.attributes, self.bias,
                           self.epilogue, self.dtype], separators=(",", ":"))

    def describe(self) -> str:
        tail = "".join(f"+{op[0]}" for op in self.epilogue)
        kind = "" if self.dtype == "float32" else f" [{self.dtype}]"
        return f"{self.op}{kind}{tail} {'x'.join(map(str, self.input_shape))} * {'x'.join(map(str, self.weight_shape))}"

    @property
    def input_names(self) -> list[str]:
        return ["X"] + (["R"] if any(op[0] == "Add" for op in self.epilogue) else [])

    def to_model(self) -> onnx.ModelProto:
        """The layer alone, with random weights of its shapes."""
        rng = np.random.default_rng(0)
        weight = onnx.numpy_helper.from_array(rng.standard_normal(self.weight_shape).astype(np.float32), "W")
        inits = [weight]
        inputs = ["X", "W"]
        if self.bias:
            channels = self.weight_shape[0] if self.op == "Conv" or dict(self.attributes).get("transB") else self.weight_shape[-1]
            inits.append(onnx.numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "B"))
            inputs.append("B")
        nodes = [helper.make_node(self.op, inputs, ["Y0"], name="layer", **dict(self.attributes))]
        graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, self.input_shape)]
        bounds = iter(self.clip_bounds)
        for i, op in enumerate(self.epilogue):
            extra = []
            if op[0] == "Add":
                extra = ["R"]
                graph_inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, None))
            elif op[0] == "AddConst":
                inits.append(onnx.numpy_helper.from_array(rng.standard_normal(op[1]).astype(np.float32), f"C{i}"))
                extra = [f"C{i}"]
            elif op[0] == "Clip":
                low, high = next(bounds, (0.0, 6.0))
                inits += [onnx.numpy_helper.from_array(np.array(low, np.float32), "lo"),
                          onnx.numpy_helper.from_array(np.array(high, np.float32), "hi")]
                extra = ["lo", "hi"]
            op_type = "Add" if op[0] == "AddConst" else op[0]
            nodes.append(helper.make_node(op_type, [f"Y{i}", *extra], [f"Y{i + 1}"], name=f"epilogue{i}"))
        nodes[-1].output[0] = "Y"
        graph = helper.make_graph(nodes, "layer", graph_inputs,
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        if len(graph_inputs) > 1:  # the residual input has the layer's output shape
            shape = next(v for v in model.graph.value_info if v.name == "Y0").type.tensor_type.shape
            model.graph.input[1].type.tensor_type.shape.CopyFrom(shape)
            model = onnx.shape_inference.infer_shapes(model)
        if self.dtype.startswith("int8"):
            model = self._quantized(model)
        return model

    def _quantized(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from .passes.quantize import ActivationStats, quantize

        channels = self.input_shape[1] if self.op == "Conv" else self.input_shape[-1]
        stats = {"X": ActivationStats(-3.0, 3.0, np.zeros(channels))}
        return quantize.apply(model, stats=stats, scheme="int8", symmetric_activations=self.dtype == "int8/int8",
                              bias_correction=False).model

    def feeds(self) -> dict[str, np.ndarray]:
        model = self.to_model()
        rng = np.random.default_rng(1)
        return {v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
                for v in model.graph.input}


def layer_spec(graph: Graph, node: onnx.NodeProto) -> LayerSpec | None:
    """The spec of a Conv/Gemm/MatMul with a constant weight and a static input shape, else None."""
    if node.op_type not in LAYER_OPS or len(node.input) < 2 or not graph.is_constant(node.input[1]):
        return None
    shape = graph.shape(node.input[0])
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    weight_shape = tuple(graph.initializer(node.input[1]).shape)
    attributes = _canonical_attributes(node, weight_shape)
    bias = len(node.input) > 2 and bool(node.input[2])
    epilogue, clip_bounds = _epilogue(graph, node)
    return LayerSpec(node.op_type, tuple(shape), weight_shape, attributes, bias, epilogue, clip_bounds=clip_bounds,
                     macs=layer_macs(graph, node) or 0)


def _canonical_attributes(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    """Attributes with ONNX's defaults filled in and the implied ones dropped, so that layers that
    differ only in how their attributes are spelled share one table entry."""
    given = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
    if node.op_type == "Conv":
        count = len(weight_shape) - 2
        defaults = {"group": 1, "strides": (1,) * count, "dilations": (1,) * count, "pads": (0,) * 2 * count,
                    "auto_pad": "NOTSET"}
        given.pop("kernel_shape", None)  # the weight's shape says it
    elif node.op_type == "Gemm":
        defaults = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    else:
        defaults = {}
    return tuple(sorted((defaults | given).items()))


def _epilogue(graph: Graph, node: onnx.NodeProto) -> tuple[tuple[tuple, ...], tuple[tuple[float, float], ...]]:
    """The elementwise ops after the layer that TVM fuses into its kernel, and the Clips' bounds."""
    ops: list[tuple] = []
    bounds: list[tuple[float, float]] = []
    tensor = node.output[0]
    while len(ops) < 3:
        user = graph.sole_consumer(tensor)
        if user is None or tensor in graph.output_names:
            break
        if user.op_type == "Relu":
            ops.append(("Relu",))
        elif (user.op_type == "Clip" and len(user.input) == 3
              and all(graph.is_constant(i) for i in user.input[1:])):
            ops.append(("Clip",))
            bounds.append((float(graph.initializer(user.input[1])), float(graph.initializer(user.input[2]))))
        elif (user.op_type == "Add" and not any(graph.is_constant(i) for i in user.input)
              and graph.shape(user.input[0]) == graph.shape(user.input[1])):
            ops.append(("Add",))
        elif user.op_type == "Add" and sum(graph.is_constant(i) for i in user.input) == 1:  # a bias
            constant = next(i for i in user.input if graph.is_constant(i))
            ops.append(("AddConst", tuple(graph.initializer(constant).shape)))
        else:
            break
        tensor = user.output[0]
    return tuple(ops), tuple(bounds)


def model_layers(model: onnx.ModelProto) -> dict[str, LayerSpec]:
    """Every timed layer of a model, by node name."""
    graph = Graph(model)
    graph.infer_shapes()
    specs = {n.name: layer_spec(graph, n) for n in graph.nodes}
    return {name: spec for name, spec in specs.items() if spec is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


class LatencyTable:
    """Milliseconds per layer spec on one target, filled on demand and cached on disk."""

    def __init__(self, target: Target, cache_dir: Path, trials: int = 0, device: str | None = None,
                 progress: Callable[[str], None] = lambda _: None, budget_s: float | None = None):
        import tvm

        from . import tvm_build

        self.target, self.trials, self.progress = target, trials, progress
        self.device = device or target.latency.get("device")
        if target.latency["method"] == "model":
            self.method = "model"
        elif self.device:
            self.method = "rpc"
        elif target.latency["method"] == "local" and not tvm_build.is_cross(target):
            self.method = "local"
        else:
            raise HwcError(f"the layers of {target.name} can only be timed on a device: give "
                           f"--device rpc://HOST:PORT/KEY")
        self.threads = self._threads()
        identity = json.dumps({"tvm": tvm.__version__, "target": target.tvm_target_dict(), "method": self.method,
                               "device": self.device, "threads": self.threads,
                               "model": target.latency.get("model") if self.method == "model" else None},
                              sort_keys=True)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        self.cache = MeasurementCache(Path(cache_dir) / "latency-tables" / f"{target.name}-{digest}.json")
        self.db_dir = tvm_build.tuning_db_dir(Path(cache_dir), target)
        self.measured = 0  # figures this instance had to make (not found in the cache)
        self.budget_s, self.spent_s = budget_s, 0.0  # seconds for new figures: only optional ones stop at it

    def budget_left(self, pending_s: float = 0.0) -> bool:
        """Whether the budget still has time after ``pending_s`` more seconds of filling. The cycle
        model is instant: only timing on hardware is budgeted."""
        return self.method == "model" or self.budget_s is None or self.spent_s + pending_s < self.budget_s

    def _threads(self) -> int | None:
        if self.method != "local":
            return None
        threads = self.target.latency.get("threads", "auto")
        return physical_cores() if threads == "auto" else int(threads)

    def _entry_key(self, spec: LayerSpec) -> str:
        return spec.key() if self.method == "model" else f"{spec.key()}|trials={self.trials}"

    def latencies(self, specs: Iterable[LayerSpec], within_budget: bool = False) -> dict[LayerSpec, float]:
        """Milliseconds for each spec, timing those not yet in the table, in the order given.

        ``within_budget``: stop timing new shapes once the table's budget is spent; the result then
        holds only the specs that have a figure."""
        specs = list(dict.fromkeys(specs))
        missing = [s for s in specs if self.cache.get(self._entry_key(s)) is None]
        if missing and (self.budget_left() or not within_budget):
            self._fill(missing, within_budget)
        figures = {s: self.cache.get(self._entry_key(s)) for s in specs}
        return {s: latency.median_ms for s, latency in figures.items() if latency is not None}

    def predict_ms(self, model: onnx.ModelProto) -> tuple[float, dict[str, float]]:
        """The sum of the model's layer latencies, and each layer's figure by node name."""
        layers = model_layers(model)
        table = self.latencies(layers.values())
        per_layer = {name: table[spec] for name, spec in layers.items()}
        return float(sum(per_layer.values())), per_layer

    def predict_layers_ms(self, layers: dict[str, LayerSpec]) -> float | None:
        """The sum of these layers' latencies, or None if the budget ran out before all had a figure."""
        table = self.latencies(layers.values(), within_budget=True)
        if len(table) < len(set(layers.values())):
            return None
        return float(sum(table[spec] for spec in layers.values()))

    # ------------------------------------------------------------------ filling
    def _fill(self, specs: list[LayerSpec], within_budget: bool = False) -> None:
        started = time.monotonic()
        try:
            self._fill_timed(specs, lambda: not within_budget or self.budget_left(time.monotonic() - started))
        finally:
            if within_budget:  # the model's own layers are always timed and not counted
                self.spent_s += time.monotonic() - started

    def _fill_timed(self, specs: list[LayerSpec], time_left: Callable[[], bool]) -> None:
        how = {"local": f"on this machine ({self.threads} threads)", "rpc": f"on {self.device}",
               "model": "with the cycle model"}[self.method]
        tuned = f", tuned with {self.trials} trials each" if self.trials and self.method != "model" else ""
        self.progress(f"latency table: timing {len(specs)} new layer shape(s) {how}{tuned}")
        if self.method == "model":
            for spec in specs:
                self.cache.put(self._entry_key(spec), self._modelled(spec))
        else:
            with tempfile.TemporaryDirectory(prefix="hwc-layers-") as scratch:
                libraries = []
                for index, spec in enumerate(specs, 1):
                    if not time_left():
                        self.progress(f"latency table: budget of {self.budget_s:g} s spent; "
                                      f"{len(specs) - index + 1} shape(s) left for a later run")
                        specs = specs[:index - 1]
                        break
                    libraries.append(self._compile(spec, Path(scratch) / f"layer{index}.so"))
                    if self.method == "local":  # time at once: the figure is kept even if a later layer fails
                        latency, _ = LocalMeasurer(self.threads, repeat=10, min_repeat_ms=20).measure(
                            libraries[-1], spec.feeds(), spec.input_names)
                        self.cache.put(self._entry_key(spec), latency)
                    self.progress(f"[{index}/{len(specs)}] layer {spec.describe()}"
                                  + (f": {self.cache.get(self._entry_key(spec)).median_ms:.4f} ms" if self.method == "local" else " compiled"))
                if self.method == "rpc":
                    self._measure_remote(specs, libraries)
        self.measured += len(specs)

    def _compile(self, spec: LayerSpec, path: Path) -> Path:
        from . import tvm_build

        mod = tvm_build.import_onnx(spec.to_model())
        if spec.dtype.startswith("int8"):
            from .int8_lowering import lower_qdq

            mod, _ = lower_qdq(mod)
        kernels = tvm_build.lower(mod, self.target)
        if self.trials > 0:
            tvm_build.tune(kernels, self.target, self.trials, self.db_dir, device=self.device)
        executable = tvm_build.build(kernels, self.target, self.db_dir)
        tvm_build.export(executable, self.target, path.parent, path.name)
        return path

    def _measure_remote(self, specs: list[LayerSpec], libraries: list[Path]) -> None:
        from .remote import Job, measure_all, parse_device

        jobs = [Job(self._entry_key(s), lib, s.feeds(), s.input_names) for s, lib in zip(specs, libraries)]
        measure_all(jobs, parse_device(self.device), self.cache, self.target.tvm["target"]["kind"],
                    progress=self.progress)

    def _modelled(self, spec: LayerSpec) -> Latency:
        from .latency_model import cycles_latency, layer_cycles

        graph = Graph(spec.to_model())
        graph.infer_shapes()
        weights = "pow2" if spec.dtype == "pow2" else "int8"
        layer = next(n for n in graph.nodes if n.op_type == spec.op)  # int8 specs start with a QDQ pair
        return cycles_latency(layer_cycles(graph, layer, self.target.latency["model"], weights), self.target)
