"""float16: the pass against ONNX Runtime on the float32 model, the per-layer fallback, and the CUDA
target that takes its arch from the GPU found."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import hwc, make_model, shared_model
from hwcompress.config.gpu import gpu_found
from hwcompress.compress.quantize import quantize_model
from hwcompress.data.calibration import Calibration
from hwcompress.model import reference as ort
from hwcompress.model.loading import load_model
from hwcompress.passes import run_canonical
from hwcompress.passes.float16 import float16

# float16 keeps 11 significant bits: a layer's output within a few 1e-3 of float32, relative.
FLOAT16_TOLERANCE = 1e-2


def _relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(expected - got).max() / np.abs(expected).max())


def _detector_like(rng) -> onnx.ModelProto:
    """Conv -> Sigmoid*x (SiLU) -> Resize (float32-only scales) -> Conv -> two outputs, one of them
    also read by a Softmax (kept float32), plus a ConstantOfShape of float values added in."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["a1"]),
        helper.make_node("Resize", ["a1", "", "scales"], ["r1"], mode="nearest"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["boxes"]),
        helper.make_node("Shape", ["boxes"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["half"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["boxes", "half"], ["shifted"]),
        helper.make_node("Softmax", ["shifted"], ["scores"], axis=1),
    ]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("boxes", [1, 6, 32, 32]), ("scores", [1, 6, 32, 32])],
                      {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
                       "scales": np.array([1.0, 1.0, 2.0, 2.0]), "w2": rng.normal(0, 0.3, (6, 8, 1, 1)),
                       "b2": rng.normal(0, 0.1, 6)}, opset=17)


def test_float16_keeps_the_interface_and_matches_float32_within_tolerance(rng):
    model = _detector_like(rng)
    result = float16.apply(model)
    half = result.model
    onnx.checker.check_model(half)
    assert [(v.name, v.type.tensor_type.elem_type) for v in half.graph.input] == [("x", TensorProto.FLOAT)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in half.graph.output] == [
        ("boxes", TensorProto.FLOAT), ("scores", TensorProto.FLOAT)]
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert weights["w1_fp16"] == weights["w2_fp16"] == TensorProto.FLOAT16
    assert weights["scales"] == TensorProto.FLOAT, "Resize takes float32 scales only"
    assert "Softmax" in {n.op_type for n in half.graph.node} and result.log.details["float32_nodes"] == ["Softmax"]
    feed = {"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
    expected, got = ort.run(model, feed), ort.run(half, feed)
    for e, g in zip(expected, got):
        assert g.dtype == np.float32 and 0 < _relative_error(e, g) < FLOAT16_TOLERANCE


def test_float16_on_a_real_network_halves_the_weights_and_stays_close(rng):
    model, _ = run_canonical(load_model(shared_model("mobilenetv2-fp32")))
    half = float16(model)
    size = lambda m: sum(t.ByteSize() for t in m.graph.initializer)  # noqa: E731
    assert size(half) < 0.55 * size(model)
    feed = {"input": rng.normal(0, 1, (1, 3, 224, 224)).astype(np.float32)}
    (expected,), (got,) = ort.run(model, feed), ort.run(half, feed)
    assert _relative_error(expected, got) < FLOAT16_TOLERANCE
    assert np.argmax(expected) == np.argmax(got)


def test_a_layer_ruined_by_float16_stays_float32(rng):
    """x = 1000 + signal: float16 rounds x in steps of 0.5, and a layer whose weights cancel the
    offset (columns summing to zero) returns mostly rounding noise; measured, it stays float32."""
    w1 = rng.normal(0, 1, (64, 32))
    w1 -= w1.mean(axis=0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="cancels"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
    model = make_model(nodes, [("x", [1, 64])], [("y", [1, 10])], {"w1": w1, "w2": rng.normal(0, 0.3, (32, 10))})
    feeds = [{"x": (1000 + rng.normal(0, 1, (1, 64))).astype(np.float32)} for _ in range(24)]
    calibration = Calibration(feeds, "synthetic")
    ruined, plain = quantize_model(model, calibration, "float16", min_sqnr_db=-np.inf)
    kept, report = quantize_model(model, calibration, "float16")
    assert plain["fp32_fallback"] == [] and plain["output_error"] > 0.05
    assert report["fp32_fallback"] == ["cancels"] and report["output_error"] < 1e-2
    assert report["layer_sqnr_db"]["cancels"] > 40 and report["activations"] == "float16"


def test_quantize_cli_float16_only_where_the_target_has_it(tmp_path):
    refused = hwc("quantize", str(shared_model("mnist-8")), "--scheme", "float16", "--calib", "random",
                  "-o", str(tmp_path / "cpu.onnx"))
    assert refused.returncode == 2 and "target host does not support float16" in refused.stderr
    done = hwc("quantize", str(shared_model("mnist-8")), "--scheme", "float16", "-t", "nvidia-t4", "--calib", "random",
               "-o", str(tmp_path / "t4.onnx"))
    assert done.returncode == 0, done.stderr
    assert "weights and activations in float16" in done.stdout
    types = {t.data_type for t in onnx.load(tmp_path / "t4.onnx").graph.initializer if t.data_type != TensorProto.INT64}
    assert types == {TensorProto.FLOAT16}


@pytest.mark.skipif(gpu_found() is not None, reason="this machine has a GPU: the cuda target builds here")
def test_cuda_target_without_a_gpu_is_one_clear_line(tmp_path):
    result = hwc("compile", str(shared_model("mnist-8")), "-t", "cuda", "-o", str(tmp_path / "cuda"))
    assert result.returncode == 2 and "no NVIDIA GPU with a driver was found here" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cuda").exists()


@pytest.mark.skipif(gpu_found() is None, reason="no NVIDIA GPU with a driver on this machine")
def test_cuda_target_builds_for_the_gpu_found_and_runs_on_it(tmp_path):
    from hwcompress.compile import CompileOptions, compile_model

    gpu = gpu_found()
    report = compile_model(shared_model("mnist-8"), tmp_path / "cuda",
                           CompileOptions(target="cuda", tune_trials=0, cache_dir=tmp_path / "cache"))
    assert report["target"]["tvm"]["arch"] == gpu.arch and gpu.name in report["target"]["hardware_found"]
    assert report["latency"]["method"] == "local" and report["latency"]["median_ms"] > 0
    assert report["accuracy"]["max_relative_error"] < 1e-3


def test_float16_build_accumulates_in_float32_and_matches_onnx_runtime(tmp_path):
    """The CPU build of a float16 model: each conv and matmul sums in float32 (a float16 sum lost
    3x the accuracy on MobileNetV2), and the artifact is checked within the float16 tolerance."""
    from hwcompress.backend.float16_accumulate import accumulate_in_float32
    from hwcompress.backend.importer import import_onnx
    from hwcompress.compile import CompileOptions, compile_model
    from hwcompress.model.fileio import save_model

    model, _ = run_canonical(load_model(shared_model("mnist-8")))
    half = float16(model)
    text = str(accumulate_in_float32(import_onnx(half)))
    assert text.count('out_dtype="float32"') == 3, "MNIST's two convs and its matmul"
    save_model(half, tmp_path / "half.onnx")
    report = compile_model(tmp_path / "half.onnx", tmp_path / "out",
                           CompileOptions(tune_trials=0, cache_dir=tmp_path / "cache", repeat=3))
    accuracy = report["accuracy"]
    assert "float16" in accuracy["criterion"] and accuracy["tolerance"] == 1e-2
    assert 0 < accuracy["max_relative_error"] < 1e-2


def test_float16_refuses_control_flow_in_one_line():
    """An If's branches are subgraphs this pass does not rewrite: refused, not half-converted."""
    from hwcompress.errors import HwcError

    branch = lambda name, value: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [name], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))],
        name, [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], name="choose", then_branch=branch("a", 1.0),
                              else_branch=branch("b", -1.0))]
    graph = helper.make_graph(nodes, "flow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(HwcError, match=r"float16 does not convert models with control flow \(choose\)"):
        float16(model)
