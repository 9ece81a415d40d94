"""The hwc command as a user runs it: outputs, JSON, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import sys
import subprocess
import zipfile
from pathlib import Path

import onnx
import pytest

from conftest import ROOT, assert_same_outputs, hwc, op_count, shared_model


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hwc: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_help_and_version():
    result = hwc("--help")
    assert result.returncode == 0
    for command in ("targets", "inspect", "fold", "example"):
        assert command in result.stdout
    from hwcompress import __version__

    assert hwc("--version").stdout.strip() == f"hwc {__version__}"


def test_targets_lists_each_with_a_description():
    result = hwc("targets")
    assert result.returncode == 0
    lines = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == {"host", "arm-a72", "nvidia-t4", "cuda", "npu16"} and all(len(d) > 10 for d in lines.values())
    data = json.loads(hwc("targets", "--json").stdout)
    assert {t["name"]: t["latency"] for t in data}["npu16"] == "model"


def test_example_then_fold_then_inspect(tmp_path):
    model_path, folded_path = tmp_path / "r18.onnx", tmp_path / "out" / "r18.folded.onnx"
    assert hwc("example", "resnet18", "-o", str(model_path), "--input-size", "64").returncode == 0
    result = hwc("fold", str(model_path), "-o", str(folded_path), "--json")
    assert result.returncode == 0, result.stderr
    assert "fold_batchnorm" in result.stderr, "progress lines go to stderr"
    report = json.loads(result.stdout)
    assert report["max_relative_error"] < 1e-4 and report["nodes_after"] < report["nodes_before"]
    folded = onnx.load(str(folded_path))
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(onnx.load(str(model_path)), folded)
    info = json.loads(hwc("inspect", str(folded_path), "--json").stdout)
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 64, 64]}]
    assert info["op_census"]["Conv"] == 20 and info["parameters"] > 11_000_000
    assert sum(layer["macs"] for layer in info["layers"]) == info["macs"] > 0
    assert all(layer["macs"] > 0 for layer in info["layers"])


def test_inspect_real_model_shows_shapes_and_opset():
    result = hwc("inspect", str(shared_model("squeezenet1.1-caffe2")))
    assert result.returncode == 0
    assert "data_0: float32 [1x3x224x224]" in result.stdout and "ai.onnx 7" in result.stdout
    assert "Conv 26" in result.stdout


def test_inspect_quantized_model_names_unsupported_ops():
    result = hwc("inspect", str(shared_model("mobilenetv2-12-int8")))
    assert result.returncode == 0 and "not supported by hwc" in result.stdout and "QLinearConv" in result.stdout


@pytest.mark.parametrize("make_bad,fragment", [
    (lambda p: p.write_text("hello"), "not"),
    (lambda p: p.write_bytes(shared_model("mnist-8").read_bytes()[:3000]), "ONNX"),
    (lambda p: None, "no such file"),
])
def test_bad_model_file_is_one_line_and_writes_nothing(tmp_path, make_bad, fragment):
    bad, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    make_bad(bad)
    _one_line_error(hwc("fold", str(bad), "-o", str(out)), fragment)
    assert not out.exists() and list(tmp_path.iterdir()) == ([bad] if bad.exists() else [])


def test_unsupported_and_dynamic_models_are_refused(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    weights = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("QLinearSoftmax", ["q", "s", "z", "s", "z"], ["y"], domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              source / "unsupported.onnx")
    _one_line_error(hwc("fold", str(source / "unsupported.onnx"), "-o", str(out / "o.onnx")),
                    "unsupported op com.microsoft.QLinearSoftmax")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source / "dynamic.onnx")
    _one_line_error(hwc("fold", str(source / "dynamic.onnx"), "-o", str(out / "o.onnx")), "--input-shape")
    assert not any(out.iterdir())


def test_bad_targets_dir_is_one_line(tmp_path):
    (tmp_path / "t.yaml").write_text("name: x\n")
    _one_line_error(hwc("targets", "--targets-dir", str(tmp_path)), "invalid target file")


def test_installed_wheel_finds_builtin_targets_and_profiles(tmp_path):
    """From a wheel, not the checkout: the YAMLs must be inside the package."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("hwcompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hwcompress/targets/arm-a72.yaml" in names and "hwcompress/profiles/npu16.yaml" in names
    assert "hwcompress/backend/cuda_driver_stub.c" in names and "hwcompress/backend/run_vm.cc" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import hwcompress, hwcompress.config as c, hwcompress.compress.profile as p; "
            "print(hwcompress.__file__); print(sorted(t.name for t in c.list_targets())); "
            "print(p.get_profile('npu16').source)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    module, names_line, profile = result.stdout.splitlines()
    assert module.startswith(str(site)) and profile.startswith(str(site))
    assert names_line == "['arm-a72', 'cuda', 'host', 'npu16', 'nvidia-t4']"
    assert Path(profile).name == "npu16.yaml"


def test_counted_progress_drives_a_bar_on_a_terminal_and_lines_elsewhere():
    import io

    from hwcompress.cli import ProgressLines

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        lines = ProgressLines(stream=stream)
        for k in range(1, 4):
            lines.progress.at("tune")("tuning trials", done=k, total=3)
        lines.progress("done")
        lines.close()
    assert "%|" in terminal.getvalue() and "3/3" in terminal.getvalue()  # a tqdm bar
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "%|" not in log.getvalue() and lines[0].endswith("[1/3] tuning trials")
