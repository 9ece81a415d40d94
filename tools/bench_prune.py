#!/usr/bin/env python3
"""Structured pruning on real models and data: top-1 and TVM latency per ratio, with and without
least-squares reconstruction, and with channels ranked by filter L1 norm or by what their readers
lose (``--importances``; the latency column is of the last one), in one run. ``top1 refit``: groups
only linear ops touch narrowed in their best directions (the default); ``top1 select``: their
channels selected like the others', refit the same way.

    python tools/bench_prune.py [--tasks mnist,squeezenet] [--ratios 0.1,0.2,0.3,0.4,0.5]
                                [--importances l1,reconstruction] [--trials 0] [--calib 64]

MNIST CNN: calibrated on the first --calib test images, scored on the other ones.
SqueezeNet 1.1: calibrated on --calib ImageNet samples, scored on the rest.
Latency: each model compiled by hwc for the host and timed with TVM (--trials tuning trials;
0 = untuned kernels, comparable only with each other). Ratios are of the untouched model.
"""

from __future__ import annotations

import sys

import numpy as np
from benchlib import bench_parser, load_task, score, tvm_latency_ms

from hwcompress.errors import HwcError
from hwcompress.compress.prune import prune_model


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--importances", default="l1,reconstruction")
    args = parser.parse_args()
    importances = args.importances.split(",")
    print(f"{'task':11} {'ratio':>5} {'importance':>14} {'params':>10} {'top1 plain':>10} {'top1 refit':>10} {'top1 select':>11} "
          f"{'TVM ms':>8} {'vs base':>7}")
    for name in args.tasks.split(","):
        task = load_task(name, args.calib)
        base_top1 = score(task.model, task.images, task.labels)
        base_ms = None if args.no_latency else tvm_latency_ms(task.model, args.trials, args.cache_dir)
        params = sum(int(np.prod(t.dims)) for t in task.model.graph.initializer)
        print(f"{name:11} {0:5.2f} {'-':>14} {params:10,} {base_top1:10.2f} {base_top1:10.2f} {base_top1:11.2f} "
              f"{base_ms or float('nan'):8.2f} {1.0:7.2f}", flush=True)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for importance in importances:
                try:
                    plain, _ = prune_model(task.model, ratio, importance=importance, calibration=task.calibration(),
                                           reconstruct=False)
                    refit, report = prune_model(task.model, ratio, importance=importance,
                                                calibration=task.calibration())
                    selected, _ = prune_model(task.model, ratio, importance=importance,
                                              calibration=task.calibration(), narrow_linear=False)
                except HwcError as exc:
                    print(f"{name:11} {ratio:5.2f} {importance:>14} {exc}")
                    continue
                last = importance == importances[-1]
                ms = None if args.no_latency or not last else tvm_latency_ms(refit, args.trials, args.cache_dir)
                print(f"{name:11} {ratio:5.2f} {importance:>14} {report['parameters_after']:10,} "
                      f"{score(plain, task.images, task.labels):10.2f} {score(refit, task.images, task.labels):10.2f} "
                      f"{score(selected, task.images, task.labels):11.2f} "
                      f"{ms or float('nan'):8.2f} {(ms / base_ms) if ms and base_ms else float('nan'):7.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
