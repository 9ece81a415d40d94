#!/usr/bin/env python3
"""int8 against what a user would pick instead: ONNX Runtime fp32 and ONNX Runtime's own int8.

    python tools/bench_int8.py [--models mobilenetv2,squeezenet,resnet18,mobilenetv3] [--calib 64]
                               [--trials 0] [--rounds 8]

Per model, four runners timed in alternating rounds in this one process, same thread count:
ONNX Runtime fp32; ONNX Runtime int8 from its ``quantize_static`` (QDQ, per-channel s8 weights, u8
activations, the same calibration images); hwc fp32 (``hwc compile``); hwc int8 (``hwc quantize``,
then ``hwc compile``: the int8 lowering and the dot-product kernels). Top-1 of each on the shared
ImageNet images not used for calibration: against the labels for the real models (MobileNetV2,
SqueezeNet 1.1), against the fp32 model's own top-1 for the generated ones with random weights
(ResNet-18; MobileNetV3-style with HardSwish and squeeze-and-excitation), where only agreement
means anything. The compiled artifacts are scored, not a simulation. Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchlib import SHARED, cpu_description, load_task

from hwcompress.backend.runtime import load_local, outputs_to_numpy
from hwcompress.compile import CompileOptions, compile_model
from hwcompress.compress.quantize import quantize_model
from hwcompress.config import physical_cores
from hwcompress.data import datasets
from hwcompress.data.calibration import Calibration
from hwcompress.measure.local import alternating_latency_ms
from hwcompress.model import reference as ort
from hwcompress.model.examples import EXAMPLES
from hwcompress.model.fileio import save_model
from hwcompress.passes import run_canonical

GENERATED = ("resnet18", "mobilenetv3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenetv2,squeezenet,resnet18,mobilenetv3")
    parser.add_argument("--calib", type=int, default=64, help="calibration images, never scored")
    parser.add_argument("--trials", type=int, default=0, help="tuning trials per compile (0 = untuned)")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=8, help="alternating timing rounds")
    args = parser.parse_args()
    threads = physical_cores()
    print(f"CPU: {cpu_description()}; {threads} threads for every runner", flush=True)
    rows = []
    for name in args.models.split(","):
        rows.append(bench(name, args, threads))
        print_table(rows)
    return 0


def bench(name: str, args, threads: int) -> dict:
    model, calib, images, labels = load(name, args.calib)
    input_name = model.graph.input[0].name
    calibration = Calibration([{input_name: x[None]} for x in calib], f"{len(calib)} ImageNet images")
    ort_int8 = ort_quantize_static(model, calibration)
    hwc_int8, _ = quantize_model(model, calibration)
    with tempfile.TemporaryDirectory() as scratch:
        libraries = {}
        for variant, m in (("hwc fp32", model), ("hwc int8", hwc_int8)):
            path = Path(scratch) / f"{variant.replace(' ', '_')}.onnx"
            save_model(m, path)
            out = Path(scratch) / f"out_{variant.replace(' ', '_')}"
            compile_model(path, out, CompileOptions(target="host", tune_trials=args.trials, cache_dir=args.cache_dir,
                                                    repeat=10))
            libraries[variant] = out / "model.so"
        feed = {input_name: images[:1]}
        sessions = {"ORT fp32": ort.session(model, threads=threads), "ORT int8": ort.session(ort_int8, threads=threads)}
        vms = {v: load_local(lib, feed, [input_name]) for v, lib in libraries.items()}

        def predict_ort(session):
            return np.array([session.run(None, {input_name: x[None]})[0].reshape(-1).argmax() for x in images])

        def predict_tvm(vm_args):
            vm, device, _ = vm_args
            from hwcompress.backend.runtime import to_device
            return np.array([outputs_to_numpy(vm["main"](*to_device({input_name: x[None]}, [input_name], device)))[0]
                             .reshape(-1).argmax() for x in images])

        predictions = {k: predict_ort(s) for k, s in sessions.items()}   # ORT before TVM's thread pool runs
        predictions |= {k: predict_tvm(v) for k, v in vms.items()}
        runners = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
        runners |= {k: (lambda v=v: v[0]["main"](*v[2])) for k, v in vms.items()}
        rounds = alternating_latency_ms(runners, rounds=args.rounds)
    truth = labels if labels is not None else predictions["ORT fp32"]
    base = rounds["ORT fp32"]
    return {"model": name, "labels": "ImageNet labels" if labels is not None else "fp32 top-1",
            "images": len(images),
            "ms": {k: float(np.median(v)) for k, v in rounds.items()},
            "vs_ort_fp32": {k: float(np.median([b / t for b, t in zip(base, v)])) for k, v in rounds.items()},
            "hwc_int8_over_ort_int8": float(np.median([h / o for h, o in zip(rounds["hwc int8"], rounds["ORT int8"])])),
            "top1": {k: float((p == truth).mean() * 100) for k, p in predictions.items()}}


def load(name: str, calib: int):
    """(fp32 model, calibration images, scored images, labels or None)."""
    if name in GENERATED:
        x, _ = datasets.imagenet_samples(SHARED / "data" / "imagenet_samples_224" /
                                         "imagenet_samples_224_every4th_class.npz", "torch")
        model, _ = run_canonical(EXAMPLES[name](input_size=224))
        return model, x[:calib], x[calib:], None
    task = load_task(name, calib)
    model, _ = run_canonical(task.model)
    return model, task.calib, task.images, task.labels


def ort_quantize_static(model, calibration: Calibration):
    """ONNX Runtime's own static int8 quantization, as its documentation shows it: QDQ, per-channel."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration.feeds)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as scratch:
        src, dst = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(dst)


def print_table(rows: list[dict]) -> None:
    variants = ("ORT fp32", "ORT int8", "hwc fp32", "hwc int8")
    print(f"\n{'model':12} " + " ".join(f"{v + ' ms':>12}" for v in variants)
          + f" {'hwc int8 speed-up':>18} {'hwc/ORT int8':>13}   top-1 % (" + ", ".join(variants) + ")")
    for r in rows:
        print(f"{r['model']:12} " + " ".join(f"{r['ms'][v]:12.2f}" for v in variants)
              + f" {r['vs_ort_fp32']['hwc int8']:17.2f}x {r['hwc_int8_over_ort_int8']:13.2f}   "
              + ", ".join(f"{r['top1'][v]:.1f}" for v in variants) + f" vs {r['labels']} on {r['images']} images",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
