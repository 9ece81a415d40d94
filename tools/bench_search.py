#!/usr/bin/env python3
"""#18's compile goal, measured the way a user meets it: ``hwc compile --calib --val --labels`` (search,
then the final tuned compile) per model, with a cold tuning cache unless ``--cache-dir`` is given, its
wall time, and the compiled model's latency beside ONNX Runtime fp32 on the original model (the
report's figure: same machine, inputs and threads, alternating rounds in one process).

    python tools/bench_search.py [--tasks squeezenet,mobilenetv2,resnet18] [--trials 500] [--calib 64]
                                 [--val 186] [--profile default] [--search-seconds S] [--cache-dir DIR]

SqueezeNet and MobileNetV2 are scored (top-1) on the ImageNet samples not used for calibration; the
generated ResNet-18 has random weights and random inputs, so its metric is agreement with the
uncompressed model's classes. Goal: hwc >= 2.5x faster than ONNX Runtime fp32 (hwc/ORT <= 0.4) at
<= 1 pt drop, in <= 15 minutes with a cold cache on 2 cores.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import bench_parser, cpu_description, load_task

from hwcompress.backend.build import DEFAULT_TUNE_TRIALS
from hwcompress.compile import CompileOptions, SearchOptions, compile_for_target
from hwcompress.config import physical_cores
from hwcompress.model.examples import resnet18
from hwcompress.model.fileio import save_model
from hwcompress.progress import Progress


def main() -> int:
    parser = bench_parser(__doc__)
    parser.set_defaults(tasks="squeezenet,mobilenetv2,resnet18", trials=DEFAULT_TUNE_TRIALS, calib=64)
    parser.add_argument("--val", type=int, default=186, help="validation samples scored per candidate")
    parser.add_argument("--profile", default="default", help="the search's profile (default: the target's)")
    parser.add_argument("--search-seconds", type=float, help="the search's wall-time budget (default: profile's)")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; {physical_cores()} threads", flush=True)
    rows = []
    for name in args.tasks.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-search-") as scratch:
            folder = Path(scratch)
            model, calib, val, labels = _task(name, args.calib, args.val, folder / "model.onnx")
            input_name = model.graph.input[0].name
            np.savez(folder / "calib.npz", **{input_name: calib})
            np.savez(folder / "val.npz", **{input_name: val})
            if labels is not None:
                np.save(folder / "labels.npy", labels)
            options = CompileOptions(target="host", tune_trials=args.trials,
                                     cache_dir=args.cache_dir or folder / "cache")
            search = SearchOptions(profile=args.profile, calib=str(folder / "calib.npz"), val=str(folder / "val.npz"),
                                   labels=str(folder / "labels.npy") if labels is not None else None,
                                   search_seconds=args.search_seconds)
            started = time.monotonic()
            report = compile_for_target(folder / "model.onnx", folder / "out", options, search,
                                        Progress(lambda e: print(e.text, file=sys.stderr, flush=True)).within(name)
                                        ).report
            rows.append((name, report, time.monotonic() - started))
    print(f"{'model':12} {'ORT ms':>8} {'hwc ms':>8} {'hwc/ORT':>8} {'metric':>10} {'before':>7} {'after':>7} "
          f"{'drop':>6} {'wall':>8}  chosen")
    for name, report, seconds in rows:
        base, found = report["baseline"], report["search"]
        print(f"{name:12} {base['onnxruntime_ms']:8.2f} {base['tvm_ms']:8.2f} {base['tvm_over_onnxruntime']:8.2f} "
              f"{_short(found['accuracy_metric']):>10} {found['baseline_accuracy']:7.2f} {found['accuracy']:7.2f} "
              f"{found['accuracy_drop']:6.2f} {seconds / 60:6.1f} m  {', '.join(found['applied']) or 'nothing'}")
    print(f"({'cache ' + str(args.cache_dir) if args.cache_dir else 'each model with an empty tuning cache'}; "
          f"{args.trials} tuning trials; hwc/ORT: median of the alternating rounds' ratios)")
    return 0


def _short(metric: str) -> str:
    """The metric's name in a table column: top-1, agreement, cosine, or the user's function."""
    return next((word for word in ("agreement", "cosine") if word in metric), metric.split(" (")[0])


def _task(name: str, calib_count: int, val_count: int, path: Path):
    """(model, calibration inputs, validation inputs, labels or None), the model file written to
    ``path`` as a user would give it (a shared model: its own file)."""
    if name == "resnet18":
        images = np.random.default_rng(0).standard_normal((calib_count + val_count, 3, 224, 224)).astype(np.float32)
        model = resnet18()
        save_model(model, path)
        return model, images[:calib_count], images[calib_count:], None
    task = load_task(name, calib_count)
    shutil.copyfile(task.path, path)
    return task.model, task.calib, task.images[:val_count], task.labels[:val_count]


if __name__ == "__main__":
    sys.exit(main())
