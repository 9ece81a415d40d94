"""Shared pieces of the benchmark scripts: the real models and data sets, scoring, TVM latency."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hwcompress.data import datasets  # noqa: E402
from hwcompress.model import reference as ort  # noqa: E402
from hwcompress.data.calibration import Calibration  # noqa: E402
from hwcompress.compile import CompileOptions, compile_model  # noqa: E402
from hwcompress.model.fileio import save_model  # noqa: E402
from hwcompress.backend.runtime import load_local  # noqa: E402
from hwcompress.measure.local import alternating_latency_ms, median_call_ms  # noqa: E402,F401
from hwcompress.model.loading import load_model  # noqa: E402
from hwcompress.passes import canonicalize_reshape, eliminate_identity  # noqa: E402

SHARED = ROOT.parent / "shared"


@dataclass
class Task:
    """A real model with labelled data: calibration images and held-out evaluation images."""

    name: str
    model: onnx.ModelProto
    calib: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    path: Path | None = None  # the model file as given (before the loading rewrites in ``model``)

    def calibration(self) -> Calibration:
        name = self.model.graph.input[0].name
        return Calibration([{name: x[None]} for x in self.calib], f"{len(self.calib)} {self.name} images")


def load_task(name: str, calib_count: int) -> Task:
    """``mnist``: the MNIST CNN, calibrated on the first test images, scored on the rest.
    ``squeezenet``/``mobilenetv2``: scored on the ImageNet samples not used for calibration."""
    if name == "mnist":
        model_dir, (x, y) = "mnist-8", datasets.mnist(SHARED / "data" / "mnist_t10k")
    else:
        model_dir = {"squeezenet": "squeezenet1.1-caffe2", "mobilenetv2": "mobilenetv2-fp32"}[name]
        x, y = datasets.imagenet_samples(SHARED / "data" / "imagenet_samples_224" /
                                         "imagenet_samples_224_every4th_class.npz",
                                         "caffe" if name == "squeezenet" else "torch")
    path = SHARED / "models" / model_dir / "model.onnx"
    model = canonicalize_reshape(eliminate_identity(load_model(path)))
    return Task(name, model, x[:calib_count], x[calib_count:], y[calib_count:], path)


def bench_parser(doc: str):
    """The options every accuracy/latency benchmark takes."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mnist,squeezenet")
    parser.add_argument("--calib", type=int, default=64, help="images used for calibration, never scored")
    parser.add_argument("--trials", type=int, default=0, help="tuning trials per compile (0 = untuned)")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--no-latency", action="store_true")
    return parser


def ort_latency_ms(model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, repeat: int = 50) -> float:
    """Median ONNX Runtime fp32 latency after warm-up, with ``threads`` intra-op threads."""
    session = ort.session(model, threads=threads)
    return median_call_ms(lambda: session.run(None, feed), repeat, warmup=5)


def score(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.session(model)
    name = model.graph.input[0].name
    outputs = np.stack([session.run(None, {name: im[None]})[0] for im in images])
    return datasets.top1(outputs, labels)


def tvm_latency_ms(model: onnx.ModelProto, trials: int, cache_dir: Path | None, repeat: int = 20,
                   int8_compute: bool = True) -> float:
    """Median latency of the model compiled and measured on this machine (host target)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        save_model(model, path)
        report = compile_model(path, Path(scratch) / "out",
                               CompileOptions(target="host", tune_trials=trials, cache_dir=cache_dir, repeat=repeat,
                                              int8_compute=int8_compute))
    return report["latency"]["median_ms"]


def side_by_side(path: Path, library: Path, threads: int, repeat: int) -> tuple[float, float, float]:
    """ORT on the original model vs the compiled library, alternating rounds: the median ms of
    each and the median of the per-round ratios TVM / ORT."""
    model = load_model(path, require_supported=False, simplify=False)
    feeds = ort.random_inputs(model)
    session = ort.session(model, threads=threads)
    vm, _, args = load_local(library, feeds, list(feeds))
    main = vm["main"]
    rounds = alternating_latency_ms({"ort": lambda: session.run(None, feeds), "tvm": lambda: main(*args)},
                                    rounds=max(5, repeat // 5))
    ratios = [t / o for t, o in zip(rounds["tvm"], rounds["ort"])]
    return float(np.median(rounds["ort"])), float(np.median(rounds["tvm"])), float(np.median(ratios))


def cpu_description() -> str:
    """The CPU model and the vector/matrix instruction sets that matter here, as lscpu reads them."""
    import platform

    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp")
           if f in flags]
    return f"{model}; {', '.join(isa) or 'no AVX2/AVX-512/NEON dot-product flags'}"
