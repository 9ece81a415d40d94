#!/usr/bin/env python3
"""The product's goal, measured on this machine in one run: for each model, ONNX Runtime fp32 on the
original, TVM on the original, and hwc's chosen model (search on the host profile), as latency
ratios to ONNX Runtime, with the top-1 drop of the chosen model.

    python tools/bench_search.py [--tasks squeezenet,mobilenetv2,resnet18] [--trials 300] [--calib 32]
                                 [--layer-trials 0] [--max-rounds 6] [--layer-candidates 4]
                                 [--table-budget 1200] [--budget 600]

SqueezeNet and MobileNetV2 are scored on the ImageNet samples not used for calibration; the
generated ResNet-18 has random weights, so its "top-1" is agreement with the uncompressed model.
Goal: hwc >= 2x faster than ONNX Runtime fp32 at <= 1 pt top-1 drop.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import numpy as np
from benchlib import bench_parser, load_task, ort_latency_ms

from hwcompress.data.calibration import Calibration
from hwcompress.compile import CompileOptions
from hwcompress.compress.profile import get_profile
from hwcompress.config import get_target, physical_cores
from hwcompress.progress import Progress
from hwcompress.model.examples import resnet18
from hwcompress.passes import run_canonical
from hwcompress.search.loop import search


def main() -> int:
    parser = bench_parser(__doc__)
    parser.set_defaults(tasks="squeezenet,mobilenetv2,resnet18", trials=300, calib=32)
    parser.add_argument("--val", type=int, default=100, help="validation images scored per trial")
    parser.add_argument("--layer-trials", type=int, help="tuning trials per latency-table layer (default: profile's)")
    parser.add_argument("--max-rounds", type=int, help="search rounds (default: the profile's)")
    parser.add_argument("--layer-candidates", type=int, help="per-layer steps scored per round (default: profile's)")
    parser.add_argument("--table-budget", type=float, help="seconds per run for new latency-table shapes (default: profile's)")
    parser.add_argument("--budget", type=float, help="wall-time budget of each search in seconds (default: profile's)")
    args = parser.parse_args()
    target, threads = get_target("host"), physical_cores()
    profile = get_profile("host")
    overrides = {"layer_trials": args.layer_trials, "max_rounds": args.max_rounds,
                 "layer_candidates": args.layer_candidates, "table_budget_s": args.table_budget,
                 "budget_s": args.budget}
    profile = replace(profile, search=replace(profile.search, **{k: v for k, v in overrides.items() if v is not None}))
    rows = []
    for name in args.tasks.split(","):
        if name == "resnet18":
            model, _ = run_canonical(resnet18())
            rng = np.random.default_rng(0)
            images = rng.standard_normal((args.calib + args.val, 3, 224, 224)).astype(np.float32)
            calib, val, labels = images[:args.calib], images[args.calib:], None
        else:
            task = load_task(name, args.calib)
            model, calib, val, labels = task.model, task.calib, task.images[:args.val], task.labels[:args.val]
        input_name = model.graph.input[0].name
        calibration = Calibration([{input_name: x[None]} for x in calib], f"{len(calib)} images")
        # Before any TVM run: TVM's pinned worker threads would slow ONNX Runtime in this process.
        onnx_runtime = ort_latency_ms(model, {input_name: val[:1]}, threads)
        options = CompileOptions(target="host", tune_trials=args.trials, cache_dir=args.cache_dir, repeat=20)
        started = time.monotonic()
        result = search(model, target, profile, options, calibration,
                        [{input_name: x[None]} for x in val], labels, max_accuracy_drop=1.0,
                        progress=Progress(lambda e: print(e.text, file=sys.stderr, flush=True)).within(name))
        rows.append((name, onnx_runtime, result.baseline_latency_ms, result.latency_ms,
                     result.baseline_accuracy - result.accuracy, ", ".join(result.applied) or "none",
                     time.monotonic() - started))
    print(f"{'model':12} {'ORT ms':>8} {'TVM ms':>8} {'hwc ms':>8} {'TVM/ORT':>8} {'hwc/ORT':>8} {'drop':>6}  chosen")
    for name, o, t, h, drop, chosen, seconds in rows:
        print(f"{name:12} {o:8.2f} {t:8.2f} {h:8.2f} {t / o:8.2f} {h / o:8.2f} {drop:6.2f}  {chosen} "
              f"({seconds:.0f} s, {threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
