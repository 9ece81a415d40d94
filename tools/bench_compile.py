#!/usr/bin/env python3
"""TVM (tuned by hwc) vs ONNX Runtime fp32, side by side in one process, same thread count.

    python tools/bench_compile.py [--trials N] [--threads T] [--models resnet18,mobilenetv2,squeezenet]

Prints one line per model with both medians and the ratio TVM / ORT (below 1.0: TVM is faster).
After all models are compiled, the two are timed in alternating rounds (ORT, TVM, ORT, ...) with
the same Python call loop; the ratio is the median of the rounds' ratios, so that drift of a shared
machine's speed cancels out. The compile report's own TVM latency is printed alongside. The
tuning database under --cache-dir is kept, so a second run measures without re-tuning.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cpu_description, side_by_side  # noqa: E402

from hwcompress.compile import CompileOptions, compile_model  # noqa: E402
from hwcompress.config import physical_cores  # noqa: E402
from hwcompress.model.examples import resnet18  # noqa: E402
from hwcompress.model.fileio import save_model  # noqa: E402
from hwcompress.progress import Progress  # noqa: E402

SHARED = ROOT.parent / "shared" / "models"


def model_path(name: str, scratch: Path) -> Path:
    if name == "resnet18":
        path = scratch / "resnet18.onnx"
        save_model(resnet18(), path)
        return path
    return SHARED / {"mobilenetv2": "mobilenetv2-fp32", "squeezenet": "squeezenet1.1-caffe2"}[name] / "model.onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenetv2,squeezenet")
    parser.add_argument("--trials", type=int, default=None, help="tuning trials per model (default: hwc's)")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    names = args.models.split(",")
    print(f"CPU: {cpu_description()}; {args.threads} threads for both", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        paths = {name: model_path(name, Path(scratch)) for name in names}
        reports = {}
        for name in names:
            options = CompileOptions(target="host", cache_dir=args.cache_dir, repeat=args.repeat)
            if args.trials is not None:
                options.tune_trials = args.trials
            start = time.monotonic()
            reports[name] = compile_model(paths[name], Path(scratch) / f"out-{name}", options, Progress(
                lambda event, n=name: print(f"[{n}] {event.message}", file=sys.stderr, flush=True)))
            reports[name]["compile_s"] = time.monotonic() - start
        for name in names:
            print(f"[{name}] timing ONNX Runtime and TVM in alternating rounds", file=sys.stderr, flush=True)
            ort_ms, tvm_ms, ratio = side_by_side(paths[name], Path(scratch) / f"out-{name}" / "model.so",
                                                 args.threads, args.repeat)
            report = reports[name]
            rows.append((name, ort_ms, tvm_ms, ratio, report["latency"]["median_ms"], report["latency"]["threads"],
                         report["compile_s"], report["accuracy"]["max_relative_error"]))
    print(f"{'model':12} {'ORT ms':>9} {'TVM ms':>9} {'TVM/ORT':>8} {'report ms':>9} {'threads':>7} {'compile s':>9} "
          f"{'rel err':>8}")
    for name, ort_ms, tvm_ms, ratio, report_ms, threads, compile_s, err in rows:
        print(f"{name:12} {ort_ms:9.2f} {tvm_ms:9.2f} {ratio:8.2f} {report_ms:9.2f} {threads:7d} {compile_s:9.0f} "
              f"{err:8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
