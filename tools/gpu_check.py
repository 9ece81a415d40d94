"""The GPU check of the CUDA path, in two halves, for a lent GPU machine that has no TVM compiler.

``prepare`` (here, where hwc and nvcc are): builds MobileNetV2 (shared) and a generated ResNet-18,
each in float32 and in float16 (``hwc``'s float16 pass), for one CUDA arch, into a folder with the
inputs, ONNX Runtime's float32 outputs on them, TVM's runtime libraries and the apache-tvm-ffi wheel
for the device's Python. ``run`` (on the GPU machine; numpy, torch and that wheel only): loads each
library with TVM's runtime alone, as a deployment would, runs it on the GPU, checks it against ONNX
Runtime's outputs, and times float32 against float16 in alternating rounds. The GPU is named as
torch sees it, never assumed.

    python tools/gpu_check.py prepare --arch sm_90 --out .gpu        # here; .gpu is git-ignored
    # there (device tool: carry [".gpu"]):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && \\
        PYTHONPATH=/tmp/site python3 tools/gpu_check.py run .gpu --json $OUT/gpu_check.json

The generated ResNet-18's weights are rounded to 255 levels per tensor so that its libraries pack
small enough to travel (the device tool carries 64 MiB); timing does not depend on weight values.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "float16")
FLOAT16_TOLERANCE = 1e-2  # as hwcompress.model.reference.FLOAT16_TOLERANCE
FLOAT32_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------ prepare
def prepare(arch: str, out: Path, models: list[str], python_version: str) -> None:
    sys.path.insert(0, str(ROOT))
    import dataclasses

    import numpy as np

    import tvm
    import tvm_ffi
    from hwcompress.backend.build import BuildOptions, build_model
    from hwcompress.config.targets import get_target
    from hwcompress.model import reference as ort
    from hwcompress.model.examples import resnet18
    from hwcompress.model.loading import load_model
    from hwcompress.passes import run_canonical
    from hwcompress.passes.float16 import float16

    t4 = get_target("nvidia-t4")
    target = dataclasses.replace(t4, name=f"cuda-{arch}", description=f"CUDA {arch}",
                                 tvm_target_spec={**t4.tvm_target_spec, "arch": arch})
    out.mkdir(parents=True, exist_ok=True)
    sources = {"mobilenetv2": lambda: load_model(ROOT.parent / "shared" / "models" / "mobilenetv2-fp32" / "model.onnx"),
               "resnet18": lambda: _few_levels(resnet18())}
    manifest = {"arch": arch, "tvm": tvm.__version__, "models": {}}
    rng = np.random.default_rng(0)
    for name in models:
        model, _ = run_canonical(sources[name]())
        input_name = model.graph.input[0].name
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = rng.standard_normal(shape).astype(np.float32)
        np.save(out / f"{name}.input.npy", x)
        np.save(out / f"{name}.reference.npy", ort.run(model, {input_name: x})[0])
        for precision in PRECISIONS:
            variant = float16(model) if precision == "float16" else model
            started = time.monotonic()
            artifact = build_model(variant, target, BuildOptions(tune_trials=0), out / "build", f"{name}.{precision}.so")
            library = out / f"{name}.{precision}.so"
            artifact.library.replace(library)
            print(f"{name} {precision}: built for {arch} in {time.monotonic() - started:.0f} s, "
                  f"{library.stat().st_size / 1e6:.1f} MB", flush=True)
        manifest["models"][name] = {"input": input_name, "shape": shape}
    shutil.rmtree(out / "build", ignore_errors=True)
    lib = out / "lib"
    lib.mkdir(exist_ok=True)
    for so in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        (lib / so).write_bytes((Path(tvm.__file__).parent / "lib" / so).read_bytes())
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), f"apache-tvm-ffi=={tvm_ffi.__version__}"], check=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _pack(out)


def _few_levels(model):
    """The same network with each weight tensor rounded to 255 levels (packs ~4x smaller)."""
    import numpy as np
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.dtype == np.float32 and w.size > 1024:
            step = np.abs(w).max() / 127 or 1.0
            tensor.CopyFrom(numpy_helper.from_array((np.round(w / step) * step).astype(np.float32), tensor.name))
    return model


def _pack(out: Path) -> None:
    """The libraries into one xz archive (``run`` unpacks it); print what travels."""
    libraries = sorted(out.glob("*.so"))
    with tarfile.open(out / "libraries.tar.xz", "w:xz", preset=6) as archive:
        for library in libraries:
            archive.add(library, arcname=library.name)
    for library in libraries:
        library.unlink()
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB to carry (the device tool takes 64 MiB)")


# ---------------------------------------------------------------------------------------------- run
def run(folder: Path, rounds: int, calls: int, json_path: Path | None) -> int:
    import numpy as np
    import torch
    import tvm_ffi

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch here", file=sys.stderr)
        return 2
    with tarfile.open(folder / "libraries.tar.xz") as archive:
        archive.extractall(folder, filter="data")
    _load_runtime(folder / "lib")
    manifest = json.loads((folder / "manifest.json").read_text())
    major, minor = torch.cuda.get_device_capability(0)
    gpu = f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    print(f"GPU: {gpu}; kernels built for {manifest['arch']}"
          + ("" if manifest["arch"] == f"sm_{major}{minor}" else " (newer GPU: the PTX is compiled at load)"))
    results = {"gpu": gpu, "built_for": manifest["arch"], "tvm": manifest["tvm"], "models": {}}
    for name, info in manifest["models"].items():
        x = torch.from_numpy(np.load(folder / f"{name}.input.npy")).cuda()
        reference = np.load(folder / f"{name}.reference.npy")
        runners, row = {}, {}
        for precision in PRECISIONS:
            started = time.monotonic()
            vm = _load_vm(tvm_ffi, folder / f"{name}.{precision}.so")
            main, arg = vm["main"], tvm_ffi.from_dlpack(x)
            got = torch.from_dlpack(main(arg)).cpu().numpy()
            error = float(np.abs(got - reference).max() / np.abs(reference).max())
            limit = FLOAT16_TOLERANCE if precision == "float16" else FLOAT32_TOLERANCE
            row[precision] = {"max_relative_error": error, "within_tolerance": error <= limit, "tolerance": limit,
                              "load_and_first_run_s": time.monotonic() - started,
                              "same_class": bool(np.argmax(got) == np.argmax(reference))}
            runners[precision] = lambda main=main, arg=arg: main(arg)
        times = _alternating_ms(runners, rounds, calls, torch)
        for precision in PRECISIONS:
            row[precision]["ms"] = float(np.median(times[precision]))
        row["float32_over_float16"] = float(np.median([a / b for a, b in zip(times["float32"], times["float16"])]))
        results["models"][name] = row
    _print_table(results)
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))
    ok = all(r[p]["within_tolerance"] for r in results["models"].values() for p in PRECISIONS)
    return 0 if ok else 1


def _load_runtime(lib: Path) -> None:
    """TVM's runtime and its CUDA part; libcudart from the system or from the nvidia wheels torch uses."""
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        found = [p for d in sys.path for p in glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so.13*"),
                                                             recursive=True)]
        if not found:
            raise SystemExit("libcudart.so.13 (CUDA 13 runtime) not found: TVM's CUDA runtime needs it")
        ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
    for so in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        ctypes.CDLL(str(lib / so), mode=ctypes.RTLD_GLOBAL)


def _load_vm(tvm_ffi, library: Path):
    """A Relax VM over ``library`` on GPU 0 (CPU for shape functions), as relax.VirtualMachine does."""
    cuda, cpu, pooled = 2, 1, 2
    vm = tvm_ffi.load_module(str(library))["vm_load_executable"]()
    vm["vm_initialization"](cuda, 0, pooled, cpu, 0, pooled)
    return vm


def _alternating_ms(runners: dict, rounds: int, calls: int, torch) -> dict[str, list[float]]:
    """Per round, each runner's ms per call over ``calls`` calls (device synchronized), A B A B ..."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():  # warm-up: module load on the device, allocator pools
        for _ in range(5):
            run()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    return times


def _print_table(results: dict) -> None:
    print("\n| model | fp32 ms | fp16 ms | fp32/fp16 | fp32 max rel. err | fp16 max rel. err | "
          "same class (fp32, fp16) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["models"].items():
        print(f"| {name} | {r['float32']['ms']:.3f} | {r['float16']['ms']:.3f} | {r['float32_over_float16']:.2f} | "
              f"{r['float32']['max_relative_error']:.1e} | {r['float16']['max_relative_error']:.1e} | "
              f"{r['float32']['same_class']}, {r['float16']['same_class']} |")
    print(f"\nGPU {results['gpu']}, kernels for {results['built_for']}, TVM {results['tvm']}; errors against "
          f"ONNX Runtime float32 on CPU, same input; times: median of alternating rounds, device synchronized")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build here, for the GPU machine")
    p.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU to be lent (H200: sm_90)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--models", default="mobilenetv2,resnet18")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for the tvm-ffi wheel")
    r = sub.add_parser("run", help="on the GPU machine: load, check, time")
    r.add_argument("folder", type=Path)
    r.add_argument("--rounds", type=int, default=10)
    r.add_argument("--calls", type=int, default=20)
    r.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.arch, args.out, args.models.split(","), args.python_version)
        return 0
    return run(args.folder, args.rounds, args.calls, args.json)


if __name__ == "__main__":
    sys.exit(main())
