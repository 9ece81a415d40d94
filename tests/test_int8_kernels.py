"""int8 on the CPU's dot-product instruction: the compiled kernels give the QDQ graph's values,
really run ``vpdpbusd`` on packed weights, keep activations 8-bit between layers, and models that
arrive already quantized (QOperator) are imported and compiled."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, shared_model
from hwcompress.backend import build as tvm_build
from hwcompress.backend.importer import import_onnx
from hwcompress.backend.int8_lowering import lower_qdq
from hwcompress.backend.runtime import load_local, outputs_to_numpy
from hwcompress.compress.quantize import quantize_model
from hwcompress.config.targets import get_target
from hwcompress.data.calibration import Calibration
from hwcompress.model import reference as ort
from hwcompress.model.loading import load_model
from hwcompress.model.qoperator import qoperator_as_qdq


def _host_has_vnni() -> bool:
    from hwcompress.config.vector_unit import has_feature

    return has_feature("avx512vnni", get_target("host").tvm_target())


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="this CPU has no AVX512-VNNI")


@pytest.fixture(scope="module")
def int8_net():
    """Every int8 kernel kind: an RGB stem (3 input channels, padded to 4), 16- and 8-lane output
    channel counts (32, 24), depthwise, 3x3 dense, a residual add, a fully connected head, and odd
    spatial sizes; quantized by hwc with asymmetric u8 activations."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(0, 0.3, (32, 3, 3, 3)), "b1": rng.normal(0, 0.1, 32),
             "W2": rng.normal(0, 0.2, (24, 32, 1, 1)), "W3": rng.normal(0, 0.3, (24, 1, 3, 3)),
             "W4": rng.normal(0, 0.1, (48, 24, 3, 3)), "b4": rng.normal(0, 0.1, 48),
             "W5": rng.normal(0, 0.1, (48, 48, 1, 1)), "W6": rng.normal(0, 0.2, (48, 10)),
             "shape": np.array([1, 48])}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"]),
             helper.make_node("Conv", ["c2", "W3"], ["c3"], pads=[1, 1, 1, 1], group=24),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("Conv", ["r3", "W4", "b4"], ["c4"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c4"], ["r4"]),
             helper.make_node("Conv", ["r4", "W5"], ["c5"]),
             helper.make_node("Add", ["c5", "r4"], ["sum"]),
             helper.make_node("GlobalAveragePool", ["sum"], ["pooled"]),
             helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W6"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 17, 23])], [("y", [1, 10])], inits)
    feeds = [{"x": (rng.normal(0, 1, (1, 3, 17, 23)) + 0.5).astype(np.float32)} for _ in range(16)]
    quantized, _ = quantize_model(model, Calibration(feeds, "synthetic"), "int8", "minmax")
    return quantized, feeds


@pytest.fixture(scope="module")
def int8_build(int8_net, tmp_path_factory):
    quantized, _ = int8_net
    target = get_target("host")
    mod, lowering = lower_qdq(import_onnx(quantized))
    layers = lowering.lowered
    kernels = tvm_build.lower(mod, target)
    executable = tvm_build.build(kernels, target, None)
    path = tmp_path_factory.mktemp("int8") / "m.so"
    executable.export_library(str(path))
    return layers, kernels, executable, path


@needs_vnni
def test_int8_kernels_give_the_qdq_graphs_values(int8_net, int8_build):
    """Integer accumulators are exact and the requantization is ORT's formula, so the compiled net
    gives ORT's values of the QDQ graph run as written up to float rounding in the final scale."""
    quantized, feeds = int8_net
    layers, _, _, path = int8_build
    assert len(layers) == 6  # 4 dense convs (one the FC head as a 1x1 conv), 1 depthwise... and the FC
    session = ort.session(quantized, exact=True)
    for feed in feeds[:6]:
        vm, _, args = load_local(path, feed, ["x"])
        got = outputs_to_numpy(vm["main"](*args))[0]
        want = session.run(None, feed)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@needs_vnni
def test_int8_dense_kernels_run_vpdpbusd_on_packed_weights(int8_build):
    _, kernels, executable, _ = int8_build
    assembly = "".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert assembly.count("vpdpbusd") >= 4
    from tvm.s_tir import Schedule

    from hwcompress.backend.cpu_schedules import is_scheduled

    packed = set()
    for func in (f for f in kernels.functions.values() if is_scheduled(f)):
        sch = Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            packed |= {tuple(int(d) for d in r.source.shape) for r in sch.get(block).reads
                       if r.source.dtype == "int8"}
    # [O / tile][KH][KW][I / 4][tile / lanes][lanes][4] (7-D) or, one vector per tile, 6-D: each
    # int8 weight ends in rows of 16 or 8 output channels x 4 input channels, packed when compiling.
    # (The FC head's 10 output channels are padded to 16 inside its kernel, which reads them HWIO.)
    packed = {s for s in packed if len(s) > 4}
    assert len(packed) == 5 and all(len(s) in (6, 7) and s[-1] == 4 and s[-2] in (8, 16) for s in packed)
    assert not [gv.name_hint for gv in kernels.functions if "prepack" in gv.name_hint
                and not gv.name_hint.endswith("_prepacked")]
    assert any(s[-2] == 8 for s in packed) and any(s[-2] == 16 for s in packed)


def test_activations_stay_8_bit_between_int8_layers(int8_net, int8_build):
    """No dequantize or quantize op is left between the lowered layers (each kernel reads the
    previous one's 8-bit output, its epilogue writes 8-bit output), and no NHWC <-> NCHW transpose
    but at the input and around the pooled vector that feeds the FC head."""
    quantized, _ = int8_net
    mod, _ = lower_qdq(import_onnx(quantized))
    text = mod.script()
    assert "R.quantize" not in text and "R.dequantize" not in text
    _, kernels, _, _ = int8_build
    names = [gv.name_hint for gv in kernels.functions]
    transposes = [n for n in names if "transpose" in n]
    assert len(transposes) <= 3 and any(n.endswith("transpose_pad") or "transpose" in n and "pad" in n
                                        for n in transposes)
    int8_kernels = [n for n in names if n.startswith("fused_conv2d")]
    assert len(int8_kernels) >= 5 and not any("transpose" in n for n in int8_kernels)  # identical ones shared


def test_qoperator_model_imports_as_the_same_qdq_graph():
    """The model zoo's int8 MobileNetV2 (QLinearConv, QLinearAdd, QLinearGlobalAveragePool,
    QLinearMatMul) becomes QDQ; ONNX Runtime, which fuses QDQ back into its int8 kernels, gives
    bit-identical outputs for both forms."""
    path = shared_model("mobilenetv2-12-int8")
    original = onnx.load(str(path))
    converted = load_model(path, {"input": [1, 3, 224, 224]})
    kinds = {n.op_type for n in converted.graph.node}
    assert not {k for k in kinds if k.startswith("QLinear")} and {"QuantizeLinear", "DequantizeLinear"} <= kinds
    x = numpy_helper.to_array(onnx.load_tensor(str(path.parent / "test_data_set_0" / "input_0.pb")))
    a = ort.session(original).run(None, {"input": x})[0]
    b = ort.session(converted).run(None, {"input": x})[0]
    assert np.array_equal(a, b)


def test_qoperator_ops_from_onnxruntimes_quantizer_become_qdq(tmp_path):
    """Concat, Sigmoid, LeakyRelu, Mul, AveragePool and Gemm in QOperator form (what
    ``quantize_static(..., QuantFormat.QOperator)`` writes), each against ORT on the original."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(1)
    inits = {"W1": rng.normal(0, 0.3, (8, 3, 3, 3)), "W2": rng.normal(0, 0.3, (8, 3, 1, 1)),
             "Wg": rng.normal(0, 0.3, (10, 16)), "bg": rng.normal(0, 0.1, 10), "shape": np.array([1, 16])}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["bs"]),
             helper.make_node("Mul", ["a", "bs"], ["m"]),
             helper.make_node("LeakyRelu", ["b"], ["bl"], alpha=0.1),
             helper.make_node("Concat", ["m", "bl"], ["cat"], axis=1),
             helper.make_node("AveragePool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"]),
             helper.make_node("Reshape", ["g", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], transB=1)]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 10])], inits, opset=13)
    feeds = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    onnx.save(model, tmp_path / "f.onnx")
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                    per_channel=True)
    original = onnx.load(str(tmp_path / "q.onnx"))
    found = {n.op_type for n in original.graph.node}
    assert {"QLinearConv", "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
            "QLinearAveragePool", "QLinearGlobalAveragePool"} <= found
    converted = qoperator_as_qdq(original)
    assert not any(n.op_type.startswith(("QLinear", "QGemm")) for n in converted.graph.node)
    step = max(float(numpy_helper.to_array(t).max()) for t in original.graph.initializer
               if t.name.endswith("scale") and t.name.startswith(("y", "output")) or t.name == "y_scale") or 0.05
    for feed in feeds[:4]:
        want = ort.session(original).run(None, feed)[0]
        exact = ort.session(converted, exact=True).run(None, feed)[0]
        # ORT's fused int8 kernels round intermediate values in fixed point; the QDQ graph run as
        # written rounds in float: the outputs agree within a few output quantization steps.
        assert np.abs(want - exact).max() <= 4 * step + 1e-6


def test_already_int8_model_compiles_and_picks_onnx_runtimes_classes(tmp_path):
    from hwcompress.backend.build import BuildOptions, build_model

    path = shared_model("mobilenetv2-12-int8")
    model = load_model(path, {"input": [1, 3, 224, 224]})
    artifact = build_model(model, get_target("host"), BuildOptions(tune_trials=0, cache_dir=tmp_path / "c"), tmp_path)
    assert len(artifact.int8.lowered) == 53 and not artifact.int8.kept_float  # 52 convs and the classifier
    session = ort.session(onnx.load(str(path)))
    for case in sorted(path.parent.glob("test_data_set_*")):
        x = numpy_helper.to_array(onnx.load_tensor(str(case / "input_0.pb")))
        vm, _, args = load_local(artifact.library, {"input": x}, ["input"])
        got = outputs_to_numpy(vm["main"](*args))[0]
        assert got.argmax() == session.run(None, {"input": x})[0].argmax()


def _qdq_conv(weights: np.ndarray, zero: int, weight_type: int, activation_type: int = onnx.TensorProto.UINT8):
    """One QDQ conv: per-channel weights of ``weight_type`` with zero point ``zero``."""
    from onnx import TensorProto

    act = helper.tensor_dtype_to_np_dtype(activation_type)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(3, act), "xz"),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws")]
    if weight_type == TensorProto.INT4:
        inits += [helper.make_tensor("W", TensorProto.INT4, weights.shape, weights.ravel().tolist()),
                  helper.make_tensor("wz", TensorProto.INT4, [8], [zero] * 8)]
    else:
        dtype = helper.tensor_dtype_to_np_dtype(weight_type)
        inits += [numpy_helper.from_array(weights.astype(dtype), "W"), numpy_helper.from_array(np.full(8, zero, dtype), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["Wd"], axis=0),
             helper.make_node("Conv", ["xd", "Wd"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("case", ["uint8 weights around 128", "uint8 weights, zero point 0", "int8 weights, zero point 3",
                                  "int8 activations", "zero point too far"])
def test_weight_zero_points_are_folded_exactly_or_left_in_float_with_a_reason(tmp_path, case):
    from onnx import TensorProto

    rng = np.random.default_rng(2)
    weights = rng.integers(-100, 100, (8, 4, 3, 3))
    model = {"uint8 weights around 128": lambda: _qdq_conv(weights + 128, 128, TensorProto.UINT8),
             "uint8 weights, zero point 0": lambda: _qdq_conv(np.abs(weights), 0, TensorProto.UINT8),
             "int8 weights, zero point 3": lambda: _qdq_conv(weights, 3, TensorProto.INT8),
             "int8 activations": lambda: _qdq_conv(weights, 0, TensorProto.INT8, TensorProto.INT8),
             "zero point too far": lambda: _qdq_conv(weights, -100, TensorProto.INT8)}[case]()
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    mod, lowering = lower_qdq(import_onnx(loaded))
    if case == "zero point too far":
        assert not lowering.lowered and "do not fit int8" in lowering.kept_float[0]
    else:
        assert len(lowering.lowered) == 1 and not lowering.kept_float
    target = get_target("host")
    executable = tvm_build.build(tvm_build.lower(mod, target), target, None)
    executable.export_library(str(tmp_path / "m.so"))
    if lowering.lowered and _host_has_vnni():  # folded weights are int8, so the conv runs the dot product
        assert "vpdpbusd" in "".join(m.inspect_source("asm") for m in executable.mod.imports)
    feed = {"x": rng.normal(0, 2, (1, 4, 6, 6)).astype(np.float32)}
    vm, _, args = load_local(tmp_path / "m.so", feed, ["x"])
    want = ort.session(loaded, exact=True).run(None, feed)[0]
    assert np.abs(outputs_to_numpy(vm["main"](*args))[0] - want).max() <= 1e-5 * np.abs(want).max()


def test_four_bit_models_are_refused_in_one_line(tmp_path):
    from onnx import TensorProto

    from hwcompress.errors import HwcError

    onnx.save(_qdq_conv(np.zeros((8, 4, 3, 3), np.int64), 0, TensorProto.INT4), tmp_path / "m.onnx")
    with pytest.raises(HwcError, match="tensor 'W' is INT4; hwc compiles float and 8-bit integer models"):
        load_model(tmp_path / "m.onnx")


def test_avx_vnni_cpus_get_the_256_bit_kernel(int8_net):
    """A CPU with AVX-VNNI but no AVX-512 (Intel client cores): the same kernel on 8-lane ymm
    vectors and 16 registers. Compiled only: this machine may not execute VEX-encoded vpdpbusd."""
    import tvm

    from hwcompress.backend.build import cpu_kernels
    from hwcompress.backend.lowering_rules import allow_vectorized_rounding
    from hwcompress.backend.default_schedule import schedule_untuned

    quantized, _ = int8_net
    mod, _ = lower_qdq(import_onnx(quantized))
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"})
    allow_vectorized_rounding()
    with target, tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(schedule_untuned(cpu_kernels(mod, target), 8), target=target)
    assembly = "".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert assembly.count("vpdpbusd") >= 4 and "zmm" not in assembly


ARM_DOTPROD_TARGET = """
name: arm-a76
description: Arm Cortex-A76, NEON with the dot-product extension
tvm:
  target: {kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a76, mattr: ["+neon", "+dotprod"], num-cores: 4}
  cross_compiler: aarch64-linux-gnu-g++
channel_multiple: 4
dtypes: [float32, int8]
int8: {dot_product: true}
latency: {method: rpc, device: null}
"""


@pytest.mark.parametrize("target_name, instructions", [("arm-a72", ("smull", "saddlp", "addp")),
                                                       ("arm-a76", ("sdot",))])
def test_arm_int8_kernels_use_neon_and_match_under_qemu(int8_net, tmp_path, target_name, instructions):
    """On Arm the int8 convs run the same register-blocked kernel on NEON, with signed activations
    (the lowering flips the uint8 ones by 128): smull/saddlp/addp on a Cortex-A72, sdot where the
    target has the dot-product extension. No board here: the compiled library's outputs are
    computed under qemu-aarch64 and checked against ONNX Runtime on the QDQ graph."""
    import shutil

    from hwcompress.compile import CompileOptions, compile_model

    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run tools/install-system-deps.sh")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "arm-a76.yaml").write_text(ARM_DOTPROD_TARGET)
    target = get_target(target_name, [tmp_path / "targets"])
    quantized, _ = int8_net
    mod, lowering = lower_qdq(import_onnx(quantized), "int8")
    kernels = tvm_build.lower(mod, target)
    assembly = "".join(m.inspect_source("asm") for m in tvm_build.build(kernels, target, None).mod.imports)
    for instruction in instructions:
        assert f"\t{instruction}\t" in assembly, instruction
    from hwcompress.backend.cpu_schedules import is_scheduled

    convs = [gv.name_hint for gv in kernels.functions if "conv2d" in gv.name_hint]
    assert len(convs) >= 5 and all(is_scheduled(kernels[name]) for name in convs)
    onnx.save(quantized, str(tmp_path / "q.onnx"))
    report = compile_model(tmp_path / "q.onnx", tmp_path / "out",
                           CompileOptions(target=target_name, targets_dirs=[tmp_path / "targets"], tune_trials=0,
                                          cache_dir=tmp_path / "cache"))
    assert report["accuracy"]["checked_on"] == "qemu-aarch64 user emulation"
    assert report["accuracy"]["max_relative_error"] < 1e-3  # the same integer arithmetic as the QDQ graph
    assert len(report["int8_lowering"]["layers"]) == 6
    assert report["int8_lowering"]["instructions"].startswith(instructions[0])  # the report says which path


def test_grouped_int8_convs_read_8_bit_activations(tmp_path):
    """A grouped conv (2 groups, not depthwise) is lowered like a depthwise one: it reads the 8-bit
    activations and multiplies in float, so the tensors around it stay 8-bit; its values are the QDQ
    graph's (ONNX Runtime, as written)."""
    from hwcompress.compile import CompileOptions, compile_model

    rng = np.random.default_rng(3)
    inits = {"W1": rng.normal(0, 0.3, (16, 3, 3, 3)), "W2": rng.normal(0, 0.2, (16, 8, 3, 3)),
             "W3": rng.normal(0, 0.2, (8, 16, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=2),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Conv", ["r2", "W3"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 12, 12])], [("y", [1, 8, 12, 12])], inits)
    feeds = [{"x": rng.normal(0, 1, (1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    quantized, _ = quantize_model(model, Calibration(feeds, "synthetic"), "int8", "minmax")
    onnx.save(quantized, str(tmp_path / "q.onnx"))
    report = compile_model(tmp_path / "q.onnx", tmp_path / "out",
                           CompileOptions(tune_trials=0, cache_dir=tmp_path / "cache", repeat=3))
    lowering = report["int8_lowering"]
    assert "grouped (2 groups) conv2d (16, 8, 3, 3)" in lowering["layers"] and not lowering["kept_float"]
    assert report["accuracy"]["max_relative_error"] < 1e-3
