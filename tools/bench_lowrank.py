#!/usr/bin/env python3
"""Low-rank factorization on real models and data: top-1 and TVM latency per retained energy,
plain SVD factors vs data-aware factors, in one run.

    python tools/bench_lowrank.py [--tasks mnist,squeezenet] [--energies 0.9,0.95,0.99]
                                  [--trials 0] [--calib 64] [--no-latency]

Calibration images are never scored. Latency: each model compiled by hwc for the host and timed
with TVM (--trials tuning trials; 0 = untuned kernels, comparable only with each other). On most
CPUs a factorized 1x1 conv is slower than the original: the latency column shows where.
"""

from __future__ import annotations

import sys

from benchlib import bench_parser, load_task, score, tvm_latency_ms

from hwcompress.compress.lowrank import lowrank_model


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--energies", default="0.9,0.95,0.97,0.99")
    parser.add_argument("--min-saving", type=float, default=0.2)
    args = parser.parse_args()
    print(f"{'task':11} {'energy':>6} {'layers':>6} {'MACs kept':>9} {'top1 plain':>10} {'top1 aware':>10} "
          f"{'TVM ms':>8} {'vs base':>7}")
    for name in args.tasks.split(","):
        task = load_task(name, args.calib)
        base = score(task.model, task.images, task.labels)
        base_ms = None if args.no_latency else tvm_latency_ms(task.model, args.trials, args.cache_dir)
        print(f"{name:11} {1.0:6.2f} {0:6d} {1.0:9.2f} {base:10.2f} {base:10.2f} "
              f"{base_ms or float('nan'):8.2f} {1.0:7.2f}", flush=True)
        for energy in [float(e) for e in args.energies.split(",")]:
            plain, report = lowrank_model(task.model, energy, min_saving=args.min_saving)
            aware, aware_report = lowrank_model(task.model, energy, min_saving=args.min_saving,
                                                calibration=task.calibration())
            layers = report["lowrank"]["layers"]
            kept = (sum(i["macs_after"] for i in layers.values()) / sum(i["macs_before"] for i in layers.values())
                    if layers else 1.0)
            ms = None if args.no_latency or not layers else tvm_latency_ms(aware, args.trials, args.cache_dir)
            print(f"{name:11} {energy:6.2f} {len(layers):6d} {kept:9.2f} {score(plain, task.images, task.labels):10.2f} "
                  f"{score(aware, task.images, task.labels):10.2f} {ms or float('nan'):8.2f} "
                  f"{(ms / base_ms) if ms and base_ms else float('nan'):7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
