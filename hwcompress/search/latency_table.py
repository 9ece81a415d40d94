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

Where layers are timed on this machine's CPU, each is timed beside one fixed anchor kernel in
alternating rounds and its figure scaled to the anchor's, kept from the table's first fill (the fastest
of a few measurements, as a kernel's figure is the machine's speed when nothing disturbs it): a shared
machine's speed moves between modes within minutes, and figures made in different modes summed into
predictions that a quarter of one layer's channels saved a quarter of the model's time.

On a CPU target a conv is timed as it runs inside a model: in NHWC, with none of the layout
transposes a one-layer NCHW model would be built with (``LayerSpec.to_model(channels_last=True)``).
Those transposes had cost up to three times the conv of a large activation, so the table priced
MobileNetV2's early channels several times what they save (a quarter of the 112x112 expansion: 9.5 %
of the sum, 5.6-6.8 % measured) and its late ones a fraction (half the last 1x1 conv: 1.0 %, 6.4-8.2 %
measured); its sum ran five times the end-to-end time, now about it (3.59 vs 3.50 ms). A depthwise
conv is timed with the 1x1 conv the build merges into its kernel (``LayerSpec.reader``), its
figure the pair's less the 1x1 conv's alone. Each layer still runs with its weights warm and alone,
so the table predicts a model's latency change as the relative change of the sum of its layers, and
the search checks every prediction it acts on against an end-to-end measurement of the whole
compiled model.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import onnx

from ..backend.build import BuildOptions, build_model
from ..backend.runtime import tvm_version
from ..backend.tune import tuning_db_dir
from ..config.targets import Target
from ..errors import HwcError
from ..measure.factory import measurer_for
from ..measure.latency import Job, MeasurementCache
from ..measure.local import LocalMeasurer
from ..progress import SILENT, Progress
from .layer_spec import LayerSpec, layer_feeds, model_layers

# The kernel every figure made here is timed beside (``_time``): a 3x3 conv of a few tenths of a
# millisecond, so that its time is the cores' speed; the first anchor (32 channels at 28x28) ran 16 us,
# mostly waking the thread pool, and read 0.016-0.037 ms on one machine within a minute.
ANCHOR = LayerSpec("Conv", (1, 64, 56, 56), (64, 64, 3, 3), (("pads", (1, 1, 1, 1)),), True, (("Relu",),))
# The anchor's own figure is the fastest of this many measurements at the table's first fill: one
# measurement taken in a slow spell scaled every figure of the table by it (2.98x seen in CI).
ANCHOR_MEASUREMENTS = 5


class LatencyTable:
    """Milliseconds per layer spec on one target, filled on demand and cached on disk."""

    def __init__(self, target: Target, cache_dir: Path, trials: int = 0, device: str | None = None,
                 progress: Progress = SILENT, budget_s: float | None = None, int8_compute: bool = True,
                 winograd: bool = True):
        self.target, self.trials, self.progress = target, trials, progress
        self.measurer = measurer_for(target, device, repeat=9, min_repeat_ms=10)
        if not self.measurer.gives_latency:
            raise HwcError(f"the layers of {target.name} can only be timed on a device: give "
                           f"--device rpc://HOST:PORT/KEY")
        self.method = self.measurer.method
        # A CPU build computes convs in NHWC: their layers are timed as they run inside a model.
        self.channels_last = self.measurer.needs_library and not target.is_gpu
        self.build = BuildOptions(tune_trials=trials, cache_dir=cache_dir, device=device, int8_compute=int8_compute,
                                  winograd=winograd)
        # How the layers are built is part of what a figure means (direct or Winograd convs).
        identity = json.dumps({"tvm": tvm_version(), "target": target.tvm_target_dict(),
                               "build": {"int8_compute": int8_compute, "winograd": winograd},
                               "scale": f"anchored to {ANCHOR.key()}" if self._anchored() else "absolute",
                               "layout": "channels-last" if self.channels_last else "as-onnx",
                               **self.measurer.identity()}, sort_keys=True, default=str)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        self.cache = MeasurementCache(Path(cache_dir) / "latency-tables" / f"{target.name}-{digest}.json")
        self.db_dir = tuning_db_dir(Path(cache_dir), target)
        self.measured = 0  # figures this instance had to make (not found in the cache)
        self.budget_s, self.spent_s = budget_s, 0.0  # seconds for new figures: only optional ones stop at it
        self.deadline = None  # the search's (``loop.Deadline``): optional figures stop at it too
        self._anchor_job, self._anchor_dir = None, None  # built on the first anchored figure

    def budget_left(self, pending_s: float = 0.0) -> bool:
        """Whether the budget still has time after ``pending_s`` more seconds of filling. A cycle
        model is instant: only timing built layers is budgeted."""
        if not self.measurer.needs_library:
            return True
        if self.deadline is not None and self.deadline.passed():
            return False
        return self.budget_s is None or self.spent_s + pending_s < self.budget_s

    def _entry_key(self, spec: LayerSpec) -> str:
        return spec.key() if not self.measurer.needs_library else f"{spec.key()}|trials={self.trials}"

    def latencies(self, specs: Iterable[LayerSpec], within_budget: bool = False) -> dict[LayerSpec, float]:
        """Milliseconds for each spec, timing those not yet in the table, in the order given.

        ``within_budget``: stop timing new shapes once the table's budget is spent; the result then
        holds only the specs that have a figure."""
        timed = {spec: self._as_timed(spec) for spec in dict.fromkeys(specs)}
        needed = dict.fromkeys([t for t in timed.values()] + [t.reader for t in timed.values() if t.reader])
        missing = [s for s in needed if self.cache.get(self._entry_key(s)) is None]
        if missing and (self.budget_left() or not within_budget):
            self._fill(missing, within_budget)
        figures = {s: self.cache.get(self._entry_key(s)) for s in needed}
        result = {}
        for spec, t in timed.items():  # a depthwise layer: the pair's figure less its reader's alone
            whole, reader = figures[t], figures[t.reader] if t.reader else None
            if whole is not None and (reader is not None or not t.reader):
                result[spec] = whole.median_ms - (reader.median_ms if reader else 0.0)
        return result

    def _as_timed(self, spec: LayerSpec) -> LayerSpec:
        """Where builds merge a depthwise conv with its 1x1 reader (CPUs), the pair is timed; elsewhere
        (a GPU, a cycle model) each layer alone."""
        return spec if self.channels_last or spec.reader is None else replace(spec, reader=None)

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

    def _anchored(self) -> bool:
        return isinstance(self.measurer, LocalMeasurer) and self.measurer.device_kind == "cpu"

    def _time(self, job: Job):
        """The figure of one built layer, kept in the cache: where the layer runs here, on the
        table's own scale (timed beside the anchor kernel, whose figure the table keeps from its
        first fill), so that figures made in one of the machine's speed modes and those made in
        another compare."""
        if not self._anchored():
            return self.measurer.measure_all([job], self.cache)[job.key]
        anchor, anchor_ms = self._anchor()
        figure = self.measurer.measure_anchored(job, anchor, anchor_ms).latency
        self.cache.put(job.key, figure)
        return figure

    def _anchor(self) -> tuple[Job, float]:
        if self._anchor_job is None:
            self._anchor_dir = tempfile.TemporaryDirectory(prefix="hwc-anchor-")
            model = ANCHOR.to_model(self.channels_last)
            library = build_model(model, self.target, replace(self.build, tune_trials=0),
                                  Path(self._anchor_dir.name), "anchor.so").library
            self._anchor_job = Job("anchor|" + ANCHOR.key(), library, layer_feeds(model), ANCHOR.input_names, model)
        figure = self.cache.get(self._anchor_job.key)
        if figure is None:
            figure = min((self.measurer.measure(self._anchor_job).latency for _ in range(ANCHOR_MEASUREMENTS)),
                         key=lambda latency: latency.median_ms)
            self.cache.put(self._anchor_job.key, figure)
        return self._anchor_job, figure.median_ms

    def _fill_timed(self, specs: list[LayerSpec], time_left: Callable[[], bool]) -> None:
        """Build each layer alone (where the measurer needs a library) and time it; a measurer that
        spreads work over several devices gets the whole batch at once, the others one layer at a
        time, so that every finished figure is kept even if a later layer fails."""
        measurer = self.measurer
        tuned = f", tuned with {self.trials} trials each" if self.trials and measurer.needs_library else ""
        self.progress(f"latency table: timing {len(specs)} new layer shape(s) {measurer.description()}{tuned}")
        with tempfile.TemporaryDirectory(prefix="hwc-layers-") as scratch:
            batch: list[Job] = []
            for index, spec in enumerate(specs, 1):
                if not time_left():
                    which = (f"the search's time budget ({self.deadline.budget_s:g} s)"
                             if self.deadline is not None and self.deadline.passed() else f"budget of {self.budget_s:g} s")
                    self.progress(f"latency table: {which} spent; {len(specs) - index + 1} shape(s) left for a later run")
                    specs = specs[:index - 1]
                    break
                model = spec.to_model(self.channels_last)
                library = None
                if measurer.needs_library:
                    library = build_model(model, self.target, self.build, Path(scratch), f"layer{index}.so").library
                job = Job(self._entry_key(spec), library, layer_feeds(model), spec.input_names, model)
                if measurer.batches:
                    batch.append(job)
                    self.progress(f"layer {spec.describe()} built", index, len(specs))
                    continue
                figure = self._time(job)
                self.progress(f"layer {spec.describe()}: {figure.median_ms:.4f} ms", index, len(specs))
            if batch:
                measurer.measure_all(batch, self.cache, self.progress)
        self.measured += len(specs)
