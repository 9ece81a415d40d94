#!/usr/bin/env python3
"""Quantization on real models and data, in one run: top-1 of fp32, int8 (each calibration method)
and pow2 weights through ONNX Runtime, and the TVM latency of fp32 vs the int8 QDQ model.

    python tools/bench_quantize.py [--tasks mnist,squeezenet] [--calib 64] [--trials 0] [--no-latency]

Calibration images are never scored. TVM 0.27 imports QuantizeLinear/DequantizeLinear as float
arithmetic; hwc lowers QDQ Conv/MatMul to int8 x int8 -> int32 compute (``int8_lowering``). For the
int8 percentile model the script compiles both forms with the same tuning budget and prints the
latency of each next to fp32, and the ratio fp32 / int8 (above 1: int8 is faster).
"""

from __future__ import annotations

import sys

from benchlib import bench_parser, load_task, score, tvm_latency_ms

from hwcompress.compress.quantize import quantize_model


def main() -> int:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    print(f"{'task':11} {'variant':18} {'top1':>7} {'drop':>6} {'out err':>8} {'TVM ms':>8}")
    for name in args.tasks.split(","):
        task = load_task(name, args.calib)
        base = score(task.model, task.images, task.labels)
        fp32_ms = None if args.no_latency else tvm_latency_ms(task.model, args.trials, args.cache_dir)
        print(f"{name:11} {'fp32':18} {base:7.2f} {0:6.2f} {0:8.4f} {fp32_ms or float('nan'):8.2f}", flush=True)
        for scheme, method in [("int8", "minmax"), ("int8", "percentile"), ("int8", "entropy"),
                               ("pow2", "percentile")]:
            model, report = quantize_model(task.model, task.calibration(), scheme, method,
                                           symmetric_activations=scheme == "pow2")
            top1 = score(model, task.images, task.labels)
            timed = not args.no_latency and (scheme, method) == ("int8", "percentile")
            ms = tvm_latency_ms(model, args.trials, args.cache_dir) if timed else None
            print(f"{name:11} {scheme + ' ' + method:18} {top1:7.2f} {base - top1:6.2f} "
                  f"{report['output_error']:8.4f} {ms or float('nan'):8.2f}", flush=True)
            if timed:
                as_float = tvm_latency_ms(model, args.trials, args.cache_dir, int8_compute=False)
                print(f"{name:11}   TVM fp32 {fp32_ms:.3f} ms | int8 lowered {ms:.3f} ms (fp32/int8 "
                      f"{fp32_ms / ms:.2f}x) | QDQ as float {as_float:.3f} ms (fp32/qdq {fp32_ms / as_float:.2f}x)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
