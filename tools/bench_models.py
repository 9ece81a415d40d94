#!/usr/bin/env python3
"""TVM / ONNX Runtime fp32 for a corpus of network structures people deploy to small devices.

    python tools/bench_models.py [--trials 0] [--models yolo,mobilenetv3,...] [--cache-dir DIR]

The corpus: networks the project writes itself with random weights (``hwc example``: a YOLO-style
detector with Focus slicing, SiLU, SPP and upsampling; MobileNetV3-style with squeeze-and-excitation
and HardSwish; ShuffleNet-style with channel split and shuffle; a U-Net with ConvTranspose and
Resize; an audio CNN with a channels-last input and LeakyRelu/Max clamps; M5, a 1-D CNN over raw
audio samples; a sub-pixel
super-resolution net ending in 9 output channels and a pixel shuffle; a CRNN text-line recognizer
with two bidirectional LSTMs over 80 steps; ViT-Tiny, a vision transformer as timm exports it;
ResNet-18) and the shared
real models (MobileNetV2, SqueezeNet 1.1). Each is compiled by hwc for this machine (``--trials``:
the tuning budget, 0 = the project's own schedules only) and checked against ONNX Runtime; then both
are timed in alternating rounds in this process on the same thread count. Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cpu_description, side_by_side  # noqa: E402

from hwcompress.compile import CompileOptions, compile_model  # noqa: E402
from hwcompress.config import physical_cores  # noqa: E402
from hwcompress.model.examples import EXAMPLES  # noqa: E402
from hwcompress.model.fileio import save_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "models"
# Input sizes at which these networks are usually deployed on small devices.
CORPUS = {"yolo": 320, "mobilenetv3": 224, "shufflenet": 224, "unet": 128, "audio": 98, "waveform": 16000,
          "superres": 224, "ocr": 320, "vit": 224, "resnet18": 224}
REAL = {"mobilenetv2": "mobilenetv2-fp32", "squeezenet": "squeezenet1.1-caffe2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*CORPUS, *REAL]))
    parser.add_argument("--trials", type=int, default=0, help="tuning trials per model (default 0)")
    parser.add_argument("--cache-dir", type=Path, help="tuning database (kept between runs)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    threads = physical_cores()
    print(f"CPU: {cpu_description()}; {threads} threads for both", flush=True)
    print(f"{'model':12} {'ORT ms':>8} {'TVM ms':>8} {'TVM/ORT':>8}  max rel. error")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            if name in CORPUS:
                path = Path(scratch) / f"{name}.onnx"
                save_model(EXAMPLES[name](input_size=CORPUS[name]), path)
            else:
                path = SHARED / REAL[name] / "model.onnx"
            report = compile_model(path, Path(scratch) / f"out-{name}",
                                   CompileOptions(target="host", tune_trials=args.trials, cache_dir=args.cache_dir,
                                                  repeat=args.repeat))
            ort_ms, tvm_ms, ratio = side_by_side(path, Path(scratch) / f"out-{name}" / "model.so", threads,
                                                 args.repeat)
            print(f"{name:12} {ort_ms:8.3f} {tvm_ms:8.3f} {ratio:8.2f}  "
                  f"{report['accuracy']['max_relative_error']:.1e}", flush=True)


if __name__ == "__main__":
    main()
