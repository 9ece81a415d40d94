"""hwc compile with real TVM: host build measured and checked, arm64 and CUDA cross-builds, tuning database reuse."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import SHARED, assert_matches_report_schema, hwc, make_model, shared_model
from hwcompress.data import datasets
from hwcompress.model import reference as ort
from hwcompress.compile import CompileOptions, compile_model
from hwcompress.progress import Progress
from hwcompress.errors import HwcError

ELF_MACHINES = {62: "x86-64", 183: "aarch64"}


def elf_machine(path: Path) -> str:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return ELF_MACHINES.get(struct.unpack("<H", header[18:20])[0], "other")


def mnist_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    return datasets.mnist(SHARED / "data" / "mnist_t10k", count)


@pytest.fixture(scope="module")
def host_mnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "mnist"
    result = hwc("compile", str(shared_model("mnist-8")), "--target", "host", "-o", str(out), "--tune-trials", "0",
                 "--cache-dir", str(out.parent / "cache"), "--json", "--repeat", "10")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout), result.stderr


@pytest.mark.timed  # host_mnist's latency and its ratio to ORT (measured when the fixture is set up)
def test_host_compile_writes_everything_and_reports_a_checked_latency(host_mnist):
    out, report, stderr = host_mnist
    assert sorted(p.name for p in out.iterdir()) == [".hwc-output.json", "model.onnx", "model.so", "report.html",
                                                    "report.json", "report.md"]
    assert set(json.loads((out / ".hwc-output.json").read_text())["files"]) == {p.name for p in out.iterdir()} - {
        ".hwc-output.json"}, "the marker lists what hwc wrote"
    assert json.loads((out / "report.json").read_text()) == report
    assert_matches_report_schema(report)
    assert elf_machine(out / "model.so") == "x86-64"
    lat = report["latency"]
    assert lat["method"] == "local" and lat["repeat"] == 10 and lat["threads"] >= 1
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    assert report["accuracy"]["max_relative_error"] < 1e-3
    assert report["tvm_version"].startswith("0.27")
    assert report["files"]["model.so"]["bytes"] == (out / "model.so").stat().st_size
    md = (out / "report.md").read_text()
    assert "| local |" in md and "max abs error" in md
    assert "measuring" in stderr and "building for host" in stderr
    # What a user would get instead, measured beside it, and where the time goes.
    base = report["baseline"]
    assert base["onnxruntime_ms"] > 0 and base["tvm_ms"] > 0 and base["threads"] == lat["threads"]
    assert abs(base["tvm_over_onnxruntime"] - base["tvm_ms"] / base["onnxruntime_ms"]) < 0.5 * base["tvm_over_onnxruntime"]
    kernels = report["kernels"]
    assert kernels and any("conv2d" in k["kernel"] for k in kernels)
    assert abs(sum(k["share"] for k in kernels) - 1) < 1e-6 and kernels[0]["ms"] >= kernels[-1]["ms"]
    # Each kernel says what it computes: op, shapes (NHWC convs), fused ops; like trtexec's profile.
    assert [1, 28, 28, 8] in [k["output"] for k in kernels if k["op"] == "conv2d"]
    assert any(k["op"] == "max_pool2d" for k in kernels) and "| conv2d | 1x28x28x1 -> 1x28x28x8 |" in md
    assert "TVM / ONNX Runtime =" in md and "## Time per kernel" in md and " | hwc register-blocked | " in md
    assert (out / "report.html").read_text().count("<img") == 1


@pytest.mark.timed  # sets up host_mnist where it runs first (-k)
def test_compiled_mnist_keeps_its_accuracy_on_real_digits(host_mnist):
    """Accuracy on the compiled artifact itself, not only in ONNX Runtime."""
    from hwcompress.backend.runtime import load_local as run_local, outputs_to_numpy

    out, _, _ = host_mnist
    images, labels = mnist_images(300)
    reference = onnx.load(str(shared_model("mnist-8")))
    session = ort.session(reference)
    tvm_top1, ort_top1 = [], []
    for image in images:
        feeds = {"Input3": image[None]}
        vm, _, args = run_local(out / "model.so", feeds, ["Input3"])
        tvm_top1.append(outputs_to_numpy(vm["main"](*args))[0].argmax())
        ort_top1.append(session.run(None, feeds)[0].argmax())
    tvm_top1, ort_top1 = np.array(tvm_top1), np.array(ort_top1)
    assert (tvm_top1 == ort_top1).all()
    assert (tvm_top1 == labels).mean() > 0.97


def test_arm_a72_library_is_checked_under_qemu_but_not_timed(tmp_path):
    """No board here: the aarch64 library's outputs are computed under qemu-aarch64 (with TVM's own
    aarch64 runtime) and checked against ONNX Runtime; its latency is not measured, never an emulator's."""
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run tools/install-system-deps.sh")
    report = compile_model(shared_model("mnist-8"), tmp_path / "arm",
                           CompileOptions(target="arm-a72", tune_trials=0, cache_dir=tmp_path / "cache"))
    assert elf_machine(tmp_path / "arm" / "model.so") == "aarch64"
    assert report["latency"]["method"] == "not measured" and report["latency"]["median_ms"] is None
    assert "RPC" in report["latency"]["reason"]
    assert report["accuracy"]["max_relative_error"] < 1e-4
    assert "qemu-aarch64" in report["accuracy"]["checked_on"]
    assert report["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    text = (tmp_path / "arm" / "report.md").read_text()
    assert "not measured" in text and "Outputs computed on: qemu-aarch64 user emulation" in text


def test_arm_build_without_an_emulation_runtime_stands_unchecked_and_says_why(tmp_path, monkeypatch):
    """Offline, with HWC_AARCH64_RUNTIME naming a folder that lacks TVM's aarch64 runtime, the build
    is still written; its outputs are "not checked", with the reason."""
    (tmp_path / "runtime").mkdir()
    monkeypatch.setenv("HWC_AARCH64_RUNTIME", str(tmp_path / "runtime"))
    report = compile_model(shared_model("mnist-8"), tmp_path / "arm",
                           CompileOptions(target="arm-a72", tune_trials=0, cache_dir=tmp_path / "cache"))
    assert report["accuracy"]["max_abs_error"] is None
    assert "lacks libtvm_runtime.so, libtvm_ffi.so" in report["accuracy"]["reason"]
    assert (tmp_path / "arm" / "model.so").exists()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_nvidia_t4_library_holds_nvcc_compiled_kernels_that_tvms_runtime_loads(tmp_path):
    """One file to deploy: the kernels inside are nvcc's binary (fatbin), not CUDA source that the
    device would have to compile, and TVM's runtime reads the library back with a CUDA module."""
    import tvm

    from hwcompress.backend.cuda_kernels import load_cuda_runtime

    report = compile_model(shared_model("mnist-8"), tmp_path / "t4",
                           CompileOptions(target="nvidia-t4", tune_trials=0, cache_dir=tmp_path / "cache"))
    library = tmp_path / "t4" / "model.so"
    data = library.read_bytes()
    assert bytes.fromhex("50ed55ba") in data, "nvcc's fatbin (its magic) is inside the library"
    assert b"__global__" not in data, "no CUDA source left for the device to compile"
    assert elf_machine(library) == "x86-64", "host side of the CUDA library"
    assert not any(name.endswith(".fatbin") for name in report["files"]) and "sm_75" in report["files"]["model.so"]["note"]
    load_cuda_runtime()

    def kinds(module):
        return [module.kind] + [k for child in module.imports for k in kinds(child)]

    assert "cuda" in kinds(tvm.runtime.load_module(str(library)))
    assert report["latency"]["method"] == "not measured"
    assert report["target"]["tvm"]["arch"] == "sm_75"


def test_nvidia_t4_without_nvcc_is_a_clear_error(tmp_path):
    python_dir = os.path.dirname(os.path.realpath(shutil.which("python3") or "/usr/bin/python3"))
    result = hwc("compile", str(shared_model("mnist-8")), "-t", "nvidia-t4", "-o", str(tmp_path / "t4"),
                 env={"PATH": f"{python_dir}:/usr/bin:/bin"})
    assert result.returncode == 2 and "needs the CUDA toolkit (nvcc)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "t4").exists()


def test_unknown_target_and_failed_check_write_nothing(tmp_path):
    result = hwc("compile", str(shared_model("mnist-8")), "-t", "tpu9", "-o", str(tmp_path / "x"))
    assert result.returncode == 2 and "unknown target 'tpu9'" in result.stderr
    with pytest.raises(HwcError, match="differ from ONNX Runtime"):
        compile_model(shared_model("mnist-8"), tmp_path / "y",
                      CompileOptions(tune_trials=0, tolerance=0.0, cache_dir=tmp_path / "cache", repeat=3))
    assert not any(tmp_path.glob("[xy]*")), "a failed compile leaves no output behind"


def test_tuning_database_is_reused_by_a_second_compile(tmp_path, rng, monkeypatch):
    """Tune a two-kernel model a little; the second compile finds every kernel in the database."""
    inits = {"w": rng.normal(0, 0.2, (16, 8, 3, 3)), "b": rng.normal(0, 0.1, 16),
             "fw": rng.normal(0, 0.2, (10, 16)), "fb": np.zeros(10)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    path = tmp_path / "small.onnx"
    onnx.save_model(make_model(nodes, [("x", [1, 8, 16, 16])], [("y", [1, 10])], inits), str(path))
    options = CompileOptions(tune_trials=8, cache_dir=tmp_path / "cache", repeat=3)
    events = []
    from hwcompress.backend import tune

    monkeypatch.setattr(tune._Heartbeat, "EVERY_S", 0.5)  # a silent MetaSchedule still prints a line
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    first = compile_model(path, tmp_path / "a", options, Progress(events.append))
    assert first["tuning"]["trials_run"] > 0 and first["tuning"]["records_reused"] == 0
    assert not list(scratch.iterdir())  # every candidate's library was removed with the tuning run
    # Tuning reports structured, counted events (the CLI draws them as a bar) up to the trials it ran,
    # each with the kernels finished and the best time of the kernel just measured.
    counted = [e for e in events if e.stage == "tune" and e.counted]
    assert counted and counted[-1].done == first["tuning"]["trials_run"] <= counted[-1].total
    assert any("kernels done;" in e.message and ("best" in e.message or "no valid" in e.message) for e in counted)
    beats = [e for e in events if e.stage == "tune" and e.message.startswith("tuning: searching")]
    assert beats and all(e.message.endswith(" s)") for e in beats)
    assert {"load", "build", "measure"} <= {e.stage for e in events}
    database = Path(first["tuning"]["database"])
    assert (database / "database_tuning_record.json").stat().st_size > 0
    # Each kernel's rule-based default schedule was timed like a candidate and stored (a trace with no
    # sampling): the build takes the faster of it and MetaSchedule's best, so tuning never slows a kernel.
    assert any(e.message.startswith("tuning: timing the default schedule of") for e in events)
    records = [json.loads(line) for line in (database / "database_tuning_record.json").read_text().splitlines()]
    defaults = {workload for workload, (trace, *_rest) in records if "Sample" not in json.dumps(trace)}
    assert defaults == {workload for workload, _ in records}
    assert 0 <= first["tuning"]["defaults_kept"] <= first["tuning"]["tasks"]
    second = compile_model(path, tmp_path / "b", options)
    assert second["tuning"]["trials_run"] == 0
    assert second["tuning"]["records_reused"] == second["tuning"]["tasks"] == first["tuning"]["tasks"]
    assert second["accuracy"]["max_relative_error"] < 1e-3


def test_tuning_stops_at_its_time_budget_and_the_build_goes_on(tmp_path, rng):
    """--tune-seconds bounds a compile's tuning: when it is spent, tuning stops (records so far kept),
    the report says so, and the model is built, measured and checked as usual."""
    inits = {"fw": rng.normal(0, 0.2, (10, 64)), "fb": np.zeros(10)}
    nodes = [helper.make_node("Gemm", ["x", "fw", "fb"], ["g"], transB=1), helper.make_node("Softmax", ["g"], ["y"])]
    path = tmp_path / "fc.onnx"
    onnx.save_model(make_model(nodes, [("x", [1, 64])], [("y", [1, 10])], inits), str(path))
    report = compile_model(path, tmp_path / "out", CompileOptions(tune_trials=10_000, tune_seconds=2,
                                                                  cache_dir=tmp_path / "cache", repeat=3))
    tuning = report["tuning"]
    assert "time budget of 2 s spent" in tuning["stopped"] and tuning["trials_run"] < tuning["trials_requested"]
    assert report["accuracy"]["max_relative_error"] < 1e-3
    assert "Stopped early: time budget" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.timed  # kernels' measured share of the model
def test_kernels_too_fast_to_matter_are_not_tuned(tmp_path, rng):
    """A kernel that takes under 1% of the model's time keeps its default schedule: the model is
    profiled untuned first (MobileNetV2's final compile spent 4 of its 9 minutes tuning four
    kernels of 2 microseconds each)."""
    inits = {"w": rng.normal(0, 0.02, (512, 512, 3, 3)), "b": np.zeros(512)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),  # hand-scheduled, ~1 ms
             helper.make_node("Conv", ["c", "w", "b"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Softmax", ["f"], ["y"])]  # a few microseconds each: MetaSchedule's, if worth it
    path = tmp_path / "conv.onnx"
    onnx.save_model(make_model(nodes, [("x", [1, 512, 7, 7])], [("y", [1, 512])], inits), str(path))
    report = compile_model(path, tmp_path / "out", CompileOptions(tune_trials=8, cache_dir=tmp_path / "cache",
                                                                  repeat=3))
    tuning = report["tuning"]
    # The softmax over 512 values (a few microseconds of a ~2 ms model) is one of them at least;
    # each kernel's profile figure includes a return to Python, so the transposes may count more.
    assert 1 <= tuning["negligible"] <= tuning["tasks"] and tuning["model_ms"] > 0
    assert tuning["trials_run"] <= 8
    # Kept for being negligible is not "kept because no candidate beat it".
    assert tuning["defaults_kept"] <= tuning["tasks"] - tuning["negligible"]
    assert "not tuned: each took under 1% of the model's time" in (tmp_path / "out" / "report.md").read_text()
    assert report["accuracy"]["max_relative_error"] < 1e-3


def test_a_kernel_of_many_tensors_is_not_given_to_metaschedule(tmp_path):
    """A concatenation of 40 steps (an unrolled sequence's output) keeps its default schedule:
    MetaSchedule's search on such a kernel produced no candidate in a whole tuning budget; the
    softmax after it (two tensors) is still a tuning task."""
    import tvm

    from hwcompress.backend.build import lower
    from hwcompress.backend.importer import import_onnx
    from hwcompress.backend.tune import MAX_TUNED_TENSORS, _tasks
    from hwcompress.config import get_target

    steps = [f"s{i}" for i in range(40)]
    nodes = [helper.make_node("Sigmoid", ["x"], ["g"])]
    nodes += [helper.make_node("Mul", ["g", f"k{i}"], [s]) for i, s in enumerate(steps)]
    nodes += [helper.make_node("Concat", steps, ["c"], axis=0), helper.make_node("Softmax", ["c"], ["y"], axis=0)]
    model = make_model(nodes, [("x", [1, 8, 64])], [("y", [40, 8, 64])],
                       {f"k{i}": np.full([1], i + 1.0) for i in range(40)})
    target = get_target("host")
    kernels = lower(import_onnx(model), target)
    many = [gv.name_hint for gv, f in kernels.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and len(f.params) > MAX_TUNED_TENSORS]
    (tmp_path / "db").mkdir()
    tasks, _, _ = _tasks(kernels, target, tmp_path / "db")
    assert many and tasks and not set(many) & {t.task_name for t in tasks}


def test_npu16_latency_is_modelled_and_pads_channels_to_16(tmp_path, rng):
    from hwcompress.config.targets import get_target
    from hwcompress.measure.cycle_model import modelled_latency

    report = compile_model(shared_model("mnist-8"), tmp_path / "npu",
                           CompileOptions(target="npu16", tune_trials=100, cache_dir=tmp_path / "c"))
    assert report["latency"]["method"] == "model" and report["latency"]["median_ms"] > 0
    assert "cycle model" in report["latency"]["device"] and report["tuning"] is None
    assert "modelled, not measured" in (tmp_path / "npu" / "report.md").read_text()
    npu16 = get_target("npu16")

    def cycles(out_channels: int) -> float:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
        model = make_model(nodes, [("x", [1, 64, 28, 28])], [("y", [1, out_channels, 28, 28])],
                           {"w": rng.normal(0, 1, (out_channels, 64, 3, 3))})
        return modelled_latency(model, npu16)[0].median_ms

    assert cycles(16) < cycles(17) == cycles(32)


@pytest.mark.parametrize("name, size", [("yolo", 64), ("mobilenetv3", 64), ("shufflenet", 64), ("unet", 32),
                                        ("audio", 50), ("waveform", 1600), ("superres", 16), ("ocr", 48),
                                        ("vit", 32)])
def test_deployed_structures_compile_and_match_onnx_runtime(tmp_path, name, size):
    """Detector, SE/HardSwish, channel shuffle, ConvTranspose/Resize, channels-last audio input,
    1-D convs over raw audio, pixel shuffle after 9 output channels, bidirectional LSTMs over a
    text line's columns, a vision transformer (Gather of Q, K, V; LayerNorm; GELU with erf): each
    compiles untuned and computes what ONNX Runtime computes."""
    from hwcompress.model.examples import EXAMPLES
    from hwcompress.model.fileio import save_model

    save_model(EXAMPLES[name](input_size=size), tmp_path / "m.onnx")
    report = compile_model(tmp_path / "m.onnx", tmp_path / "out", CompileOptions(tune_trials=0, repeat=2,
                                                                                 cache_dir=tmp_path / "c"))
    assert report["accuracy"]["max_relative_error"] < 1e-3
