"""The hand-written NHWC convolution schedule: applied where it should be, exact against ONNX
Runtime, register tiles that fit the target, and TVM's thread pool using every core."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tvm
from onnx import helper
from tvm import relax
from tvm.s_tir import Schedule

from conftest import assert_built_like_onnxruntime, make_model
from hwcompress.model import reference as ort
from hwcompress.backend import build as tvm_build
from hwcompress.backend.importer import import_onnx
from hwcompress.backend.runtime import outputs_to_numpy
from hwcompress.config import get_target, physical_cores
from hwcompress.backend.channel_padding import pad_output_channels, pad_output_width
from hwcompress.backend.cpu_schedules import VectorUnit, choose_tiles, is_scheduled, nhwc_layout


def conv_node(x, w, y, bias=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [y], **attrs)


SE_SCHEDULED = 1  # the 3x3 conv; the 1x1 conv whose epilogue is the map-sized scale is left to MetaSchedule


def conv_models(rng):
    """Layers as they occur in CNNs: padded 3x3 + bias + Relu, strided, 1x1 without bias,
    residual Add after the conv, a width with no good divisor, depthwise (MobileNet's, with ReLU6),
    and grouped convs that are left to MetaSchedule (channel multiplier 2, four groups)."""
    w = lambda *shape: rng.normal(0, 0.1, shape)  # noqa: E731
    return {
        "3x3 pad bias relu": (make_model(
            [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
            [("x", [1, 32, 14, 14])], [("y", [1, 64, 14, 14])], {"w": w(64, 32, 3, 3), "b": w(64)}), 1),
        "7x7 stride 2 stem": (make_model(
            [conv_node("x", "w", "y", "b", pads=[3, 3, 3, 3], strides=[2, 2])],
            [("x", [1, 3, 32, 32])], [("y", [1, 16, 16, 16])], {"w": w(16, 3, 7, 7), "b": w(16)}), 1),
        "1x1 no bias, residual add": (make_model(
            [conv_node("x", "w", "c"), helper.make_node("Add", ["c", "x"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])],
            [("x", [1, 48, 7, 7])], [("y", [1, 48, 7, 7])], {"w": w(48, 48, 1, 1)}), 1),
        "prime width 13, 1000 channels (padded to whole vectors)": (make_model(
            [conv_node("x", "w", "y", "b")],
            [("x", [1, 16, 13, 13])], [("y", [1, 1000, 13, 13])], {"w": w(1000, 16, 1, 1), "b": w(1000)}), 1),
        "depthwise": (make_model(
            [conv_node("x", "w", "y", "b", pads=[1, 1, 1, 1], group=32)],
            [("x", [1, 32, 14, 14])], [("y", [1, 32, 14, 14])], {"w": w(32, 1, 3, 3), "b": w(32)}), 1),
        "depthwise stride 2, ReLU6": (make_model(
            [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1], strides=[2, 2], group=48),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])],
            [("x", [1, 48, 15, 15])], [("y", [1, 48, 8, 8])],
            {"w": w(48, 1, 3, 3), "b": w(48), "lo": np.array(0.0), "hi": np.array(6.0)}), 1),
        "SiLU (x * sigmoid(x): the conv output read twice)": (make_model(
            [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["c", "s"], ["y"])],
            [("x", [1, 16, 12, 12])], [("y", [1, 32, 12, 12])], {"w": w(32, 16, 3, 3), "b": w(32)}), 1),
        "HardSwish op, stride (2, 1), 5x5": (make_model(
            [conv_node("x", "w", "c", "b", pads=[2, 2, 2, 2], strides=[2, 1]), helper.make_node("HardSwish", ["c"], ["y"])],
            [("x", [1, 16, 12, 12])], [("y", [1, 32, 6, 12])], {"w": w(32, 16, 5, 5) * 4, "b": w(32)}, opset=17), 1),
        "HardSwish spelled Add/Clip/Mul/Div, depthwise": (make_model(
            [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1], group=32),
             helper.make_node("Add", ["c", "three"], ["a"]), helper.make_node("Clip", ["a", "lo", "hi"], ["g"]),
             helper.make_node("Mul", ["c", "g"], ["m"]), helper.make_node("Div", ["m", "hi"], ["y"])],
            [("x", [1, 32, 10, 10])], [("y", [1, 32, 10, 10])],
            {"w": w(32, 1, 3, 3) * 20, "b": w(32), "three": np.array(3.0), "lo": np.array(0.0),
             "hi": np.array(6.0)}), 1),
        "LeakyRelu then Max with a constant, 1x3 kernel": (make_model(
            [conv_node("x", "w", "c", "b", pads=[0, 1, 0, 1]), helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.1),
             helper.make_node("Max", ["l", "floor"], ["y"])],
            [("x", [1, 8, 10, 12])], [("y", [1, 16, 10, 12])],
            {"w": w(16, 8, 1, 3) * 5, "b": w(16), "floor": np.array(-0.05)}), 1),
        "HardSigmoid, Min with a constant, dilation 2": (make_model(
            [conv_node("x", "w", "c", pads=[2, 2, 2, 2], dilations=[2, 2]), helper.make_node("HardSigmoid", ["c"], ["h"]),
             helper.make_node("Min", ["h", "ceiling"], ["y"])],
            [("x", [1, 8, 12, 12])], [("y", [1, 16, 12, 12])], {"w": w(16, 8, 3, 3) * 10, "ceiling": np.array(0.9)}), 1),
        "squeeze-and-excitation scale (the 1x1 conv's output broadcast over the map)": (make_model(
            [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1]), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             conv_node("g", "w1", "s"), helper.make_node("Sigmoid", ["s"], ["e"]), helper.make_node("Mul", ["c", "e"], ["y"])],
            [("x", [1, 8, 8, 8])], [("y", [1, 16, 8, 8])], {"w": w(16, 8, 3, 3), "b": w(16), "w1": w(16, 16, 1, 1)}),
            SE_SCHEDULED),
        "channel multiplier 2": (make_model(
            [conv_node("x", "w", "y", pads=[1, 1, 1, 1], group=16)],
            [("x", [1, 16, 14, 14])], [("y", [1, 32, 14, 14])], {"w": w(32, 1, 3, 3)}), 0),
        "four groups of 8 (a register tile inside one group)": (make_model(
            [conv_node("x", "w", "y", pads=[1, 1, 1, 1], group=4)],
            [("x", [1, 32, 14, 14])], [("y", [1, 32, 14, 14])], {"w": w(32, 8, 3, 3)}), 1),
        "32 groups of 4 (ResNeXt), bias, ReLU": (make_model(
            [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1], group=32), helper.make_node("Relu", ["c"], ["y"])],
            [("x", [1, 128, 8, 8])], [("y", [1, 128, 8, 8])], {"w": w(128, 4, 3, 3), "b": w(128)}), 1),
        "1x1, three groups of 80 (ShuffleNetV1), residual add": (make_model(
            [conv_node("x", "w", "c", group=3), helper.make_node("Add", ["c", "x"], ["y"])],
            [("x", [1, 240, 7, 7])], [("y", [1, 240, 7, 7])], {"w": w(240, 80, 1, 1)}), 1),
        "groups of 3 channels (no vector fits a group)": (make_model(
            [conv_node("x", "w", "y", pads=[1, 1, 1, 1], group=4)],
            [("x", [1, 12, 8, 8])], [("y", [1, 12, 8, 8])], {"w": w(12, 3, 3, 3)}), 0),
    }


@pytest.mark.parametrize("name", list(conv_models(np.random.default_rng(0))))
def test_convolutions_are_hand_scheduled_and_exact_against_onnxruntime(name):
    model, expected_scheduled = conv_models(np.random.default_rng(0))[name]
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    scheduled = [gv.name_hint for gv, f in kernels.functions.items() if is_scheduled(f)]
    assert len(scheduled) == expected_scheduled, scheduled
    assert_built_like_onnxruntime(kernels, target, model)


@pytest.mark.parametrize("name", ["3x3 pad bias relu", "1x1 no bias, residual add", "depthwise stride 2, ReLU6"])
def test_epilogue_reads_the_accumulators_and_writes_the_output_once(name):
    """Bias, activation and residual add are applied to the register tile: a scheduled conv
    writes no full-size intermediate, only its output (and a dense conv its padded input)."""
    model, _ = conv_models(np.random.default_rng(0))[name]
    kernels = tvm_build.lower(import_onnx(model), get_target("host"), winograd=False)  # the direct conv
    (func,) = [f for f in kernels.functions.values() if is_scheduled(f)]
    sch = Schedule(func)
    written = {region.source for block in sch.get_child_blocks(sch.get_sblock("root"))
               for region in sch.get(block).writes if region.source.scope() == "global"}
    shapes = sorted(tuple(int(d) for d in buffer.shape) for buffer in written)
    n, c, h, w = _dims(model.graph.output[0])
    _, c_in, h_in, w_in = _dims(model.graph.input[0])
    padded_input = (1, h_in + 2, w_in + 2, c_in)
    expected = [(n, h, w, c)] + ([padded_input] if name == "3x3 pad bias relu" else [])
    assert shapes == sorted(expected)


@pytest.mark.parametrize("name", ["1x1 no bias, residual add", "depthwise stride 2, ReLU6"])
def test_accumulator_tiles_live_on_the_stack_not_in_runtime_workspace(name, monkeypatch):
    """TVM gives every ``local`` buffer a TVMBackendAllocWorkspace/FreeWorkspace pair, called per
    tile inside the parallel loop, and the accumulators then pass through that memory (an int8 1x1
    conv ran 2.4x slower). ``stack_buffers`` makes them allocas that LLVM keeps in registers."""
    from hwcompress.backend import stack_buffers

    model, _ = conv_models(np.random.default_rng(0))[name]
    target = get_target("host")

    def assembly():
        executable = tvm_build.build(tvm_build.lower(import_onnx(model), target), target, None)
        return "".join(m.inspect_source("asm") for m in executable.mod.imports)

    assert "TVMBackendAllocWorkspace" not in assembly()
    monkeypatch.setattr(stack_buffers, "STACK_LIMIT_BYTES", 0)  # TVM's own lowering, for contrast
    assert "TVMBackendAllocWorkspace" in assembly()


@pytest.mark.parametrize("shape, parallel", [([1, 1, 1, 96], False), ([1, 64, 128, 128], True)])
def test_only_kernels_with_work_enough_for_every_core_launch_threads(shape, parallel):
    """A thread-pool launch costs microseconds; an unrolled LSTM's per-step gate kernels (a few
    hundred elements) paid it at every step. Such kernels run on the calling thread; large ones
    still spread over the pool."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    model = make_model(nodes, [("x", shape)], [("y", shape)], {})
    target = get_target("host")
    executable = tvm_build.build(tvm_build.lower(import_onnx(model), target), target, None)
    llvm = "".join(m.inspect_source("ll") for m in executable.mod.imports)
    assert ("TVMBackendParallelLaunch" in llvm) == parallel


def test_kernels_are_described_by_op_shapes_and_fused_ops():
    """The per-kernel time table's words: which conv, the NHWC shapes, the epilogue in order."""
    from hwcompress.backend.kernel_info import describe_kernels, fused_ops

    assert fused_ops("fused_conv2d3_cast8_multiply4_add3_tir_round3_prepacked") == [
        "conv2d", "cast", "multiply", "add", "tir_round"]
    assert fused_ops("fused_transpose2_add_relu") == ["transpose", "add", "relu"]
    assert fused_ops("max_pool2d1") == ["max_pool2d"]
    model, _ = conv_models(np.random.default_rng(0))["depthwise stride 2, ReLU6"]
    (conv,) = [k for k in describe_kernels(tvm_build.lower(import_onnx(model), get_target("host"))).values()
               if "conv" in k["op"]]
    _, c, h, w = _dims(model.graph.input[0])
    _, _, oh, ow = _dims(model.graph.output[0])
    assert conv["op"] == "depthwise conv2d" and conv["schedule"] == "hwc register-blocked"
    assert conv["inputs"][0] == [1, h, w, c] and conv["output"] == [1, oh, ow, c]
    assert {"max", "min"} <= set(conv["fused"])
    model, _ = conv_models(np.random.default_rng(0))["32 groups of 4 (ResNeXt), bias, ReLU"]
    (conv,) = [k for k in describe_kernels(tvm_build.lower(import_onnx(model), get_target("host"))).values()
               if "conv" in k["op"]]
    assert conv["op"] == "grouped conv2d" and conv["schedule"] == "hwc register-blocked"


def test_conv_weights_are_repacked_per_channel_tile_at_compile_time():
    """The kernel reads each channel tile's filters contiguously ([O / tile][KH][KW][I][tile]); the
    repacking runs once when compiling (folded into the constant), not in every inference."""
    model, _ = conv_models(np.random.default_rng(0))["3x3 pad bias relu"]
    target = get_target("host").tvm_target()
    kernels = tvm_build.cpu_kernels(import_onnx(model), target, winograd=False)  # the direct conv
    (func,) = [f for f in kernels.functions.values() if is_scheduled(f)]
    sch = Schedule(func)
    reads = {tuple(int(d) for d in region.source.shape) for block in sch.get_child_blocks(sch.get_sblock("root"))
             for region in sch.get(block).reads}
    tile = choose_tiles(14, 64, VectorUnit.of(target)).channels
    assert (64 // tile, 3, 3, 32, tile) in reads
    assert not [gv.name_hint for gv in kernels.functions if "prepack" in gv.name_hint
                and not gv.name_hint.endswith("_prepacked")]  # no repacking left to run


def _dims(value_info) -> tuple[int, ...]:
    return tuple(d.dim_value for d in value_info.type.tensor_type.shape.dim)


@pytest.mark.parametrize("unit", [VectorUnit(16, 32), VectorUnit(8, 16), VectorUnit(4, 32)])
@pytest.mark.parametrize("width,channels", [(7, 512), (14, 256), (28, 128), (56, 64), (112, 32), (13, 1000),
                                            (55, 16), (1, 4096), (224, 24), (111, 64)])
def test_register_tiles_fit_the_register_file_and_divide_the_output(unit, width, channels):
    tiles = choose_tiles(width, channels, unit)
    assert tiles is not None
    assert tiles.width * tiles.vectors + tiles.vectors + 1 <= unit.registers  # accumulators, weights, broadcast
    assert width % tiles.width == 0 and channels % tiles.channels == 0
    assert tiles.lanes <= unit.lanes


@pytest.mark.parametrize("channels,lanes,padded", [(1000, 16, 1024), (1000, 4, 1000), (1000, 8, 1000),
                                                    (200, 16, 224), (144, 16, 144), (40, 16, 48), (85, 16, 96),
                                                    (3, 16, 16), (9, 16, 16), (18, 16, 32), (12, 16, 16),
                                                    (116, 16, 128), (24, 16, 32), (8, 16, 8), (12, 8, 16), (3, 4, 4)])
def test_output_channels_are_padded_to_whole_vector_tiles_and_sliced_back(channels, lanes, padded):
    """1000 classes compute as 1024 zero-padded channels on AVX-512 (not 8-lane vectors); AVX2's 8
    and NEON's 4 lanes divide 1000 already; a multiple of the lanes (144 = 9 x 16), or a layer one
    narrower vector holds (8 on 16 lanes), is kept; a narrow one that narrower vectors divide
    (MobileNetV2's 24, MobileNetV3's 40, ShuffleNetV2's 116, 12) pads to whole vectors; a
    narrow layer that no vector divides (a detector head's 85 = 5 + 80 classes, an image's 3
    colours, a super-resolution net's 9 = 3 x 3 sub-pixels) pads to one more vector, however wide:
    the alternative is a generic loop."""
    model = make_model([conv_node("x", "w", "y", "b")], [("x", [1, 32, 5, 5])], [("y", [1, channels, 5, 5])],
                       {"w": np.ones((channels, 32, 1, 1)), "b": np.ones(channels)})
    mod = pad_output_channels(nhwc_layout(import_onnx(model)), lanes)
    (conv,) = [b.var for b in mod["main"].body.blocks[0].bindings
               if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.conv2d"]
    assert [int(d) for d in conv.ty.shape] == [1, 5, 5, padded]
    assert [int(d) for d in mod["main"].body.body.ty.shape] == [1, channels, 5, 5]


@pytest.mark.parametrize("width,channels,padded", [(37, 64, 38), (101, 64, 102), (37, 16, 38), (17, 128, 17),
                                                   (14, 128, 14)])
def test_output_widths_without_a_register_tile_compute_a_few_more_columns(width, channels, padded):
    """37 columns (or 101 frames of a keyword spotter's spectrogram) have no register tile of 64
    channels (nor of 16: more columns than registers), a generic loop took 4x the time: the conv
    computes 1-3 more columns and slices them off. 17 columns (a tile of one vector) and 14 (two
    vectors) stay."""
    model = make_model([conv_node("x", "w", "y", "b", pads=[0, 1, 0, 1], kernel_shape=[1, 3])],
                       [("x", [1, 32, 3, width])], [("y", [1, channels, 3, width])],
                       {"w": np.ones((channels, 32, 1, 3)), "b": np.ones(channels)})
    mod = pad_output_width(nhwc_layout(import_onnx(model)), VectorUnit(16, 32))
    (conv,) = [b.var for b in mod["main"].body.blocks[0].bindings
               if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.conv2d"]
    assert [int(d) for d in conv.ty.shape] == [1, 3, padded, channels]
    assert [int(d) for d in mod["main"].body.body.ty.shape] == [1, channels, 3, width]


def test_a_conv_computing_extra_columns_is_register_blocked_and_exact(rng):
    model = make_model([conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
                       [("x", [1, 8, 5, 37])], [("y", [1, 64, 5, 37])],
                       {"w": rng.normal(0, 0.3, (64, 8, 3, 3)), "b": rng.normal(0, 0.1, 64)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    from hwcompress.backend.kernel_info import describe_kernels

    [conv] = [k for k in describe_kernels(kernels).values() if k["op"] == "conv2d"]
    assert conv["schedule"] == "hwc register-blocked" and "strided_slice" in conv["fused"], conv
    assert_built_like_onnxruntime(kernels, target, model)


def test_channel_counts_that_no_vector_divides_are_left_to_metaschedule():
    assert choose_tiles(14, 3, VectorUnit(16, 32)) is None
    assert choose_tiles(14, 18, VectorUnit(16, 32)) is None


def test_vector_units_of_the_shipped_cpu_targets():
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert VectorUnit.of(avx512) == VectorUnit(16, 32)
    assert VectorUnit.of(avx2) == VectorUnit(8, 16)
    assert VectorUnit.of(get_target("arm-a72").tvm_target()) == VectorUnit(4, 32)


def test_tvm_thread_pool_uses_every_physical_core():
    """TVM alone would take half the CPUs on x86; hwcompress starts its pool with all cores."""
    code = "import hwcompress, tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == physical_cores()


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (0.0, None), (None, float("nan"))])
def test_clip_between_convs_fuses_into_the_conv_without_layout_transposes(bounds):
    """ReLU6 (Clip with constant bounds) must not split the NHWC region: only the model's input and
    output are transposed, and the result matches ONNX Runtime (a NaN bound means unbounded)."""
    rng = np.random.default_rng(3)
    names = ["" if b is None else f"b{i}" for i, b in enumerate(bounds)]
    inits = {"w1": rng.normal(0, 0.3, (32, 16, 3, 3)), "w2": rng.normal(0, 0.3, (32, 32, 1, 1))}
    inits.update({n: np.array(b, dtype=np.float32) for n, b in zip(names, bounds) if n})
    model = make_model(
        [conv_node("x", "w1", "c1", pads=[1, 1, 1, 1]), helper.make_node("Clip", ["c1", *names], ["r"]),
         conv_node("r", "w2", "y")],
        [("x", [1, 16, 8, 8])], [("y", [1, 32, 8, 8])], inits)
    target = get_target("host")
    kernels = tvm_build.cpu_kernels(import_onnx(model), target.tvm_target())
    kernel_names = [gv.name_hint for gv in kernels.functions]
    assert sum("transpose" in n for n in kernel_names) == 2, kernel_names
    assert not any(n.startswith(("maximum", "minimum")) for n in kernel_names), kernel_names
    feeds = ort.random_inputs(model, seed=2)
    vm = relax.VirtualMachine(tvm_build.build(tvm_build.lower(import_onnx(model), target), target, None),
                              tvm.cpu())
    got = outputs_to_numpy(vm["main"](tvm.runtime.tensor(feeds["x"])))
    assert ort.relative_error(ort.run(model, feeds), got) < 1e-5


def test_untuned_kernels_get_a_parallel_vectorized_default_schedule(rng):
    """The ops around convs (pooling, resize, concat, softmax, transposes) are not naive
    single-threaded loops when no tuning record covers them, and stay exact. (The small dense layer
    runs as a 1x1 conv with its 10 outputs padded to a vector: vectorized, on one pixel.)"""
    from hwcompress.backend.default_schedule import schedule_untuned

    nodes = [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["p", "roi", "scales"], ["u"], mode="nearest"),
             helper.make_node("Concat", ["u", "c"], ["cat"], axis=1),
             helper.make_node("GlobalAveragePool", ["cat"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [1, 8, 16, 16])], [("y", [1, 10])],
                       {"w": rng.normal(0, 0.1, (32, 8, 3, 3)), "b": rng.normal(0, 0.1, 32),
                        "roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32),
                        "fw": rng.normal(0, 0.1, (10, 64)), "fb": rng.normal(0, 0.1, 10)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    with target.tvm_target():
        scheduled = schedule_untuned(kernels, VectorUnit.of(target.tvm_target()).lanes)
    funcs = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(funcs) >= 5 and all(is_scheduled(f) for f in funcs.values()), list(funcs)
    convs = [name for name in funcs if name.startswith("fused_conv2d")]
    assert len(convs) == 2 and all("T.vectorized" in funcs[name].script() for name in convs)
    parallel = [name for name, f in funcs.items() if "parallel" in f.script()]
    assert set(funcs) - set(convs) <= set(parallel), sorted(set(funcs) - set(convs) - set(parallel))
    # Pools over NHWC reduce with whole vectors of channels: each lane its own output channel.
    pools = [name for name in funcs if name.startswith(("max_pool", "mean"))]
    assert len(pools) == 2 and all("T.vectorized" in funcs[name].script() for name in pools), pools
    assert_built_like_onnxruntime(kernels, target, model)


def _one_untuned_kernel(model):
    """A one-op model lowered for the host and given the default schedule: (kernels, target, lanes,
    the one kernel's TIR script)."""
    from hwcompress.backend.default_schedule import schedule_untuned

    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    lanes = VectorUnit.of(target.tvm_target()).lanes
    with target.tvm_target():
        scheduled = schedule_untuned(kernels, lanes)
    (script,) = [f.script() for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return kernels, target, lanes, script


@pytest.mark.parametrize("length", [197, 64, 17])
def test_a_softmax_over_the_last_axis_is_one_kernel_reducing_in_vector_registers(length):
    """Attention's softmax: the hand-written row kernel (rows in parallel; the maximum and the sum
    accumulated lane by lane over whole vectors, then across lanes and the rest; each exponential
    computed once, the last elements of a row as one short vector), the values ONNX Runtime computes,
    also for rows far from zero (the maximum subtracted)."""
    from hwcompress.backend.kernel_info import describe_kernels
    from hwcompress.backend.row_kernels import SCHEDULE

    shape = [1, 3, 13, length]
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", shape)], [("y", shape)], {})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    [row_kernel] = [f for f in kernels.functions.values() if f.attrs and f.attrs.get("hwc.schedule") == SCHEDULE]
    script = row_kernel.script()
    lanes = VectorUnit.of(target.tvm_target()).lanes
    assert script.count("T.parallel") == 1 and script.count("T.exp(") == 1 + (length % lanes > 0), script
    assert "T.vectorized" in script
    assert [k["schedule"] for k in describe_kernels(kernels).values() if k["op"] == "softmax"] == [SCHEDULE]
    assert_built_like_onnxruntime(kernels, target, model, tol=1e-5)
    far = {"x": (np.random.default_rng(1).normal(0, 5, shape) + 300).astype(np.float32)}
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](tvm.runtime.tensor(far["x"])))
    assert ort.relative_error(ort.run(model, far), got) < 1e-5


@pytest.mark.parametrize("shape", [[1, 197, 192], [2, 5, 7, 40], [3, 17]])
def test_a_layer_norm_over_the_last_axis_is_one_kernel_reducing_in_vector_registers(rng, shape):
    """A transformer's LayerNorm (and ConvNeXt's over NHWC channels): the hand-written row kernel
    (mean, then variance about it, each accumulated lane by lane; the normalization on whole
    vectors and one short one), the values ONNX Runtime computes, also for rows far from zero
    with a small spread (the mean subtracted before squaring)."""
    from hwcompress.backend.kernel_info import describe_kernels
    from hwcompress.backend.row_kernels import SCHEDULE

    length = shape[-1]
    model = make_model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                       [("x", shape)], [("y", shape)],
                       {"g": rng.uniform(0.5, 1.5, length), "b": rng.normal(0, 0.1, length)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    [norm] = [k for k in describe_kernels(kernels).values() if k["schedule"] == SCHEDULE]
    assert norm["op"] == "layer" and norm["output"] == [int(np.prod(shape[:-1])), length], norm
    assert_built_like_onnxruntime(kernels, target, model, tol=1e-5)
    far = {"x": (rng.normal(0, 0.01, shape) + 1000).astype(np.float32)}
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](tvm.runtime.tensor(far["x"])))
    assert ort.relative_error(ort.run(model, far), got) < 1e-2


def test_a_short_softmax_runs_row_by_row_computing_each_exponential_once():
    """Rows shorter than a vector (12 classes) keep TVM's softmax, scheduled row by row: one
    parallel loop over rows, each row's maximum, exponentials (once each), sum and quotients in it."""
    shape = [1, 3, 13, 12]
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", shape)], [("y", shape)], {})
    kernels, target, lanes, script = _one_untuned_kernel(model)
    assert script.count("T.parallel") == 1 and script.count("T.exp(") == 1
    assert_built_like_onnxruntime(kernels, target, model)


def test_a_tensor_written_out_transposed_is_computed_row_by_row(rng):
    """A U-Net's last op, a bilinear resize computed in NHWC and leaving the model as NCHW: the
    transpose runs over the resize's rows in parallel, each row computed just before it is written
    out (not the resize's index arithmetic and gathers repeated per output vector), exactly."""
    from hwcompress.backend.default_schedule import schedule_untuned

    nodes = [conv_node("x", "w", "c", "b", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "roi", "scales"], ["y"], mode="linear")]
    model = make_model(nodes, [("x", [1, 8, 16, 16])], [("y", [1, 4, 32, 32])],
                       {"w": rng.normal(0, 0.1, (4, 8, 3, 3)), "b": rng.normal(0, 0.1, 4),
                        "roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    with target.tvm_target():
        scheduled = schedule_untuned(kernels, VectorUnit.of(target.tvm_target()).lanes)
    [script] = [f.script() for gv, f in scheduled.functions.items() if "resize" in gv.name_hint]
    assert "T.parallel" in script and script.index("T.parallel") < script.index('T.sblock("resize")'), script
    assert_built_like_onnxruntime(kernels, target, model)


@pytest.mark.parametrize("perm,shape", [([0, 3, 1, 2], [1, 40, 40, 85]), ([0, 1, 3, 2], [1, 3, 197, 64])])
def test_a_transpose_moving_the_innermost_axis_runs_by_tiles(rng, perm, shape):
    """A detector head's output leaving NHWC as NCHW (85 channels: no vector divides them) and an
    attention key transposed (ViT-Tiny, three heads): square tiles in parallel, each writing whole vectors along the
    output's innermost axis (not one strided element per cache line), exactly."""
    from hwcompress.backend.default_schedule import TRANSPOSE_TILE

    out_shape = [shape[k] for k in perm]
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], perm=perm)], [("x", shape)], [("y", out_shape)], {})
    kernels, target, lanes, script = _one_untuned_kernel(model)
    tile = min(TRANSPOSE_TILE, lanes)
    assert "T.parallel" in script and re.search(rf"T.unroll\((T.int64\()?{tile}\)", script) \
        and re.search(rf"T.vectorized\((T.int64\()?{tile}\)", script), script
    assert_built_like_onnxruntime(kernels, target, model, tol=1e-12)  # a copy: exact


def test_a_concat_is_written_in_place_by_the_convs_making_its_inputs(rng):
    """SqueezeNet's fire module, its squeeze output joined too: both expand convs write their
    channels straight into the concat's output, the squeeze output (read by the convs as well) is
    copied in, no concat kernel is left, and the model is exact."""
    nodes = [conv_node("x", "ws", "s", "bs"), helper.make_node("Relu", ["s"], ["sr"]),
             conv_node("sr", "w1", "a", "b1"), helper.make_node("Relu", ["a"], ["ar"]),
             conv_node("sr", "w3", "c", "b3", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("Concat", ["ar", "cr", "sr"], ["joined"], axis=1),
             conv_node("joined", "wo", "y", "bo")]
    model = make_model(nodes, [("x", [1, 8, 12, 12])], [("y", [1, 8, 12, 12])],
                       {"ws": rng.normal(0, 0.3, (8, 8, 1, 1)), "bs": rng.normal(0, 0.1, 8),
                        "w1": rng.normal(0, 0.3, (16, 8, 1, 1)), "b1": rng.normal(0, 0.1, 16),
                        "w3": rng.normal(0, 0.1, (16, 8, 3, 3)), "b3": rng.normal(0, 0.1, 16),
                        "wo": rng.normal(0, 0.1, (8, 40, 1, 1)), "bo": rng.normal(0, 0.1, 8)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    names = [gv.name_hint for gv in kernels.functions]
    assert not [n for n in names if n.startswith("concatenate")], names
    assert len([n for n in names if n.endswith("_into_concat")]) == 3 and "copy_into_concat" in names, names
    from hwcompress.backend.kernel_info import describe_kernels

    convs = [k for k in describe_kernels(kernels).values() if k["op"] == "conv2d" and k["output"] == [1, 12, 12, 40]]
    assert len(convs) == 2 and all(k["fused"] == ["add", "relu", "concat in place"] for k in convs), convs
    assert_built_like_onnxruntime(kernels, target, model)


def test_a_channel_shuffle_runs_in_nhwc_without_layout_transposes(rng):
    """ShuffleNet's unit: concat, the NCHW shuffle (Reshape, Transpose, Reshape), Split, one half to
    a conv and into the next concat. In NHWC it needs no transpose to NCHW and back: only the
    model's input and output are transposed, and the model is exact."""
    from hwcompress.backend.cpu_schedules import nhwc_layout

    shuffle = [helper.make_node("Reshape", ["joined", "grouped"], ["g"]),
               helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
               helper.make_node("Reshape", ["t", "flat"], ["shuffled"]),
               helper.make_node("Split", ["shuffled", "halves"], ["keep", "work"], axis=1)]
    nodes = [conv_node("x", "wa", "a", "ba"), helper.make_node("Relu", ["a"], ["ar"]),
             conv_node("x", "wb", "b", "bb"), helper.make_node("Concat", ["ar", "b"], ["joined"], axis=1),
             *shuffle, conv_node("work", "wc", "c", "bc"), helper.make_node("Concat", ["keep", "c"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 32, 8, 8])],
                       {"wa": rng.normal(0, 0.3, (16, 16, 1, 1)), "ba": rng.normal(0, 0.1, 16),
                        "wb": rng.normal(0, 0.3, (16, 16, 1, 1)), "bb": rng.normal(0, 0.1, 16),
                        "wc": rng.normal(0, 0.3, (16, 16, 1, 1)), "bc": rng.normal(0, 0.1, 16),
                        "grouped": np.array([1, 2, 16, 8, 8], np.int64), "flat": np.array([1, 32, 8, 8], np.int64),
                        "halves": np.array([16, 16], np.int64)})
    converted = nhwc_layout(import_onnx(model))["main"]
    transposes = []  # of activations (8x8 maps), between NCHW and NHWC
    relax.analysis.post_order_visit(converted.body, lambda e: transposes.append(e) if (
        isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.permute_dims"
        and [int(a) for a in e.attrs.axes] in ([0, 3, 1, 2], [0, 2, 3, 1])
        and [int(d) for d in e.ty.shape][1:3] in ([8, 8], [32, 8], [16, 8])) else None)
    inward = [t for t in transposes if [int(a) for a in t.attrs.axes] == [0, 2, 3, 1]]
    outward = [t for t in transposes if [int(a) for a in t.attrs.axes] == [0, 3, 1, 2]]
    # Only the model's input goes to NHWC (once per conv reading it), only its output back to NCHW.
    assert all(t.args[0].same_as(converted.params[0]) for t in inward), converted.script()
    assert len(outward) == 1 and int(outward[0].ty.shape[1]) == 32, converted.script()
    target = get_target("host")
    assert_built_like_onnxruntime(tvm_build.lower(import_onnx(model), target), target, model)


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_a_pad_between_convs_runs_in_nhwc_without_layout_transposes(rng, mode):
    """A reflect- (or edge-) padded conv, as super-resolution and style-transfer networks write it:
    the Pad between two convs runs on the NHWC tensor (only the model's input and output are
    transposed), and the model matches ONNX Runtime."""
    from hwcompress.backend.cpu_schedules import nhwc_layout

    nodes = [conv_node("x", "wa", "a", "ba"), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Pad", ["ar", "pads", "value"], ["p"], mode=mode), conv_node("p", "wb", "y", "bb")]
    model = make_model(nodes, [("x", [1, 16, 12, 12])], [("y", [1, 16, 12, 12])],
                       {"wa": rng.normal(0, 0.3, (16, 16, 1, 1)), "ba": rng.normal(0, 0.1, 16),
                        "wb": rng.normal(0, 0.1, (16, 16, 3, 3)), "bb": rng.normal(0, 0.1, 16),
                        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "value": np.array(0.5, np.float32)})
    converted = nhwc_layout(import_onnx(model))["main"]
    layouts = []
    relax.analysis.post_order_visit(converted.body, lambda e: layouts.append(e) if (
        isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.permute_dims"
        and not isinstance(e.args[0], tvm.ir.expr.GenericConst)  # a weight
        and int(np.prod([int(d) for d in e.ty.shape])) >= 16 * 12 * 12) else None)  # not a bias
    assert len(layouts) == 2, converted.script()  # the input to NHWC, the output back
    target = get_target("host")
    assert_built_like_onnxruntime(tvm_build.lower(import_onnx(model), target), target, model)


def test_an_input_repeated_for_a_channel_multiplier_is_transposed_once_then_repeated_in_nhwc(rng):
    """A depthwise conv with a channel multiplier on the model's input: its input repeated along
    channels (``channel_multiplier_as_depthwise``) is transposed to NHWC once and repeated there
    (a concat along the innermost axis), not concatenated in NCHW and transposed by a kernel
    gathering each output vector; the model matches ONNX Runtime."""
    from hwcompress.backend.cpu_schedules import nhwc_layout
    from hwcompress.passes import channel_multiplier_as_depthwise

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=8, pads=[1, 1, 1, 1])
    model = channel_multiplier_as_depthwise(make_model([node], [("x", [1, 8, 10, 10])], [("y", [1, 24, 10, 10])],
                                                       {"w": rng.normal(0, 1, (24, 1, 3, 3)), "b": rng.normal(0, 1, 24)}))
    converted = nhwc_layout(import_onnx(model))["main"]
    concats = []
    relax.analysis.post_order_visit(converted.body, lambda e: concats.append(e) if (
        isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.concat") else None)
    assert [int(c.attrs.axis) for c in concats] == [3], converted.script()
    target = get_target("host")
    assert_built_like_onnxruntime(tvm_build.lower(import_onnx(model), target), target, model)


def _vectorized_elementwise(function, x: np.ndarray) -> tuple[str, np.ndarray]:
    """``function`` of each element of the float32 vector ``x`` as a vectorized kernel built with the
    project's lowering rules: (its assembly, its result)."""
    from tvm import te

    from hwcompress.backend.lowering_rules import install_lowering_rules

    install_lowering_rules()
    data = te.placeholder(x.shape, "float32", name="data")
    out = te.compute(x.shape, lambda i: function(data[i]), name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([data, out]))
    loop = sch.get_loops(sch.get_sblock("out"))[0]
    sch.vectorize(sch.split(loop, [None, 16])[1])
    library = tvm.tirx.build(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                             target=get_target("host").tvm_target())
    result = tvm.runtime.tensor(np.zeros(x.shape, np.float32))
    library(tvm.runtime.tensor(x), result)
    return library.inspect_source("asm"), result.numpy()


def test_exp_is_vector_arithmetic_as_exact_as_expf():
    """exp (and sigmoid, SiLU) lowers to a polynomial in registers, not one expf call per lane (a
    YOLO-style detector's SiLU convs ran 21% slower so): relative error below 3e-7 where the
    result is a normal float, inf above, 0 below, NaN kept."""
    from tvm import te

    x = np.concatenate([np.linspace(-100, 100, 4096 - 8, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0, 88.72, 88.73, -87.3, -87.4], np.float32)])
    assembly, got = _vectorized_elementwise(lambda v: te.exp(v) + te.sigmoid(v) * 0, x)
    assert "expf" not in assembly
    want = np.exp(x.astype(np.float64))
    normal = np.isfinite(x) & (want > np.finfo(np.float32).tiny) & (want < np.finfo(np.float32).max)
    assert (np.abs(got[normal] - want[normal]) / want[normal]).max() < 3e-7
    assert np.isnan(got[-8]) and got[-7] == np.inf and got[-6] == 0 and got[-5] == 1
    assert got[-3] == np.inf and got[-1] == 0 and (x > 88.73).sum() and (got[x > 88.73] == np.inf).all()


def test_erf_is_vector_arithmetic_within_a_few_float32_steps_of_erf():
    """erf (GELU's exact form) lowers to a rational function in registers, not one erff call per
    element (ViT-Tiny's MLP activations took 8.8 ms of its 20.6 so): absolute error below 5e-7 on
    the whole line, +-1 beyond +-4, NaN kept."""
    import math

    from tvm import te

    x = np.concatenate([np.linspace(-6, 6, 4096 - 6, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0, 1e-30, -20], np.float32)])
    assembly, got = _vectorized_elementwise(te.erf, x)
    assert "erf" not in assembly
    want = np.array([math.erf(v) if not np.isnan(v) else np.nan for v in x.astype(np.float64)])
    finite = ~np.isnan(x)
    assert np.abs(got[finite] - want[finite]).max() < 5e-7
    assert np.isnan(got[-6]) and got[-5] == 1 and got[-4] == -1 and got[-3] == 0 and got[-1] == -1


@pytest.mark.parametrize("exponent", [2.0, 3.0, 2.5])
def test_a_power_by_a_small_whole_constant_is_multiplications(rng, capfd, exponent):
    """x^3 (GELU's tanh form) and x^2 are multiplications in the kernel, not one powf call per lane
    (that epilogue ran 7x its conv's time) nor a TVM warning per power on the console; other
    exponents stay powers; ONNX Runtime's values (x^3 within float32 rounding)."""
    from hwcompress.backend.kernel_info import describe_kernels

    model = make_model([helper.make_node("Pow", ["x", "e"], ["p"]), helper.make_node("Add", ["p", "x"], ["y"])],
                       [("x", [4, 64])], [("y", [4, 64])], {"e": np.array(exponent)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    ops = [op for k in describe_kernels(kernels).values() for op in [k["op"], *k["fused"]]]
    assert ("power" in ops) == (exponent == 2.5), ops
    feeds = {"x": np.abs(rng.normal(0, 3, (4, 64))).astype(np.float32)}
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](tvm.runtime.tensor(feeds["x"])))
    assert ort.relative_error(ort.run(model, feeds), got) < 1e-6
    assert "pow(x, y)" not in capfd.readouterr().err


@pytest.mark.parametrize("rows, row_padding", [([1, 14, 28], 16), ([1, 197], 16), ([1, 197], 0), ([4, 9], 16)])
def test_a_matmul_by_constant_weights_is_a_parallel_register_blocked_conv(rng, rows, row_padding, monkeypatch):
    """x @ W as a 1x1 conv: an NHWC-shaped [1, H, W, K] input as it is (the GELU after it fused
    into the conv's epilogue); 197 tokens (prime) one row of pixels with a zero row appended, or,
    where no padding may be added, one-pixel images, whose one-pixel register tile must leave the
    parallel loop parallel (it once unrolled it: minutes of compiling and one thread at run time)."""
    from hwcompress.backend import dense_as_conv

    monkeypatch.setattr(dense_as_conv, "ROW_PADDING", row_padding)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Sigmoid", ["m"], ["s"]),
             helper.make_node("Mul", ["m", "s"], ["y"])]
    model = make_model(nodes, [("x", [*rows, 64])], [("y", [*rows, 48])], {"w": rng.normal(0, 0.2, (64, 48))})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    scheduled = {gv.name_hint: f.script() for gv, f in kernels.functions.items() if is_scheduled(f)}
    (conv,) = [script for name, script in scheduled.items() if "conv2d" in name]
    assert "T.parallel" in conv and "T.vectorized" in conv
    if len(rows) == 3:
        assert len([f for f in kernels.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]) == 1  # all fused
    one_pixel_images = "T.Buffer((T.int64(197), T.int64(1), T.int64(1), T.int64(64))" in conv
    assert one_pixel_images == (rows == [1, 197] and row_padding == 0)
    assert_built_like_onnxruntime(kernels, target, model)


@pytest.mark.parametrize("windows, heads, scaled", [(1, 1, "qk"), (1, 3, "q_t"), (3, 7, "qk")])
def test_matmuls_of_two_activations_are_one_batched_kernel_reading_the_projections_and_scale(rng, windows, heads,
                                                                                          scaled):
    """Self-attention's scaled Q K^T and softmax(.) V (one head; three; 3 windows x 7 heads, more
    products than the old one-conv-per-head route took) over 13 tokens (no register tile divides
    them) with 16-wide heads: each product is one hand-written batched kernel reading the Q, K and
    V projections where the heads' elements lie (the split into heads and K's transpose never
    written out), the scale (on the scores, or on Q as CVNets writes it) applied as the scores are
    stored (no kernel of its own), and the result is ONNX Runtime's."""
    from hwcompress.backend.batch_matmul import SCHEDULE
    from hwcompress.backend.kernel_info import describe_kernels

    tokens, d = 13, 16
    width = heads * d
    split = lambda name: [helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_h"]),  # noqa: E731
                          helper.make_node("Transpose", [f"{name}_h"], [f"{name}_t"], perm=[0, 2, 1, 3])]
    nodes = [helper.make_node("MatMul", ["x", w], [n]) for n, w in (("q", "wq"), ("k", "wk"), ("v", "wv"))]
    nodes += split("q") + split("k") + split("v")
    scale = [helper.make_node("Mul", [scaled, "scale"], [f"{scaled}_scaled"])]
    nodes += scale if scaled == "q_t" else []
    nodes += [helper.make_node("Transpose", ["k_t"], ["kT"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_t_scaled" if scaled == "q_t" else "q_t", "kT"], ["qk"]),
              *(scale if scaled == "qk" else []),
              helper.make_node("Softmax", ["qk_scaled" if scaled == "qk" else "qk"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v_t"], ["o"]),
              helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o_t", "joined_shape"], ["y"])]
    weights = {w: rng.normal(0, 0.3, (width, width)) for w in ("wq", "wk", "wv")}
    model = make_model(nodes, [("x", [windows, tokens, width])], [("y", [windows, tokens, width])],
                       {**weights, "scale": np.array(d ** -0.5), "heads_shape": np.array([windows, tokens, heads, d]),
                        "joined_shape": np.array([windows, tokens, width])})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    described = describe_kernels(kernels)
    products = {name: k for name, k in described.items() if k["schedule"] == SCHEDULE}
    assert sorted(k["output"] for k in products.values()) == [[windows * heads, tokens, tokens],
                                                               [windows * heads, tokens, d]], described
    # Q K^T reads the projections, V's product V's: the heads' split and K's transpose are index
    # maps, not kernels writing copies; the one transpose left joins the heads after P V.
    projection = [windows, tokens, width]
    assert [k["inputs"] for k in products.values() if k["output"][-1] == tokens] == [[projection, projection]]
    assert [k["inputs"][1] for k in products.values() if k["output"][-1] == d] == [projection]
    assert [k["inputs"] for k in described.values() if k["op"] == "transpose"] == [[[windows * heads, tokens, d]]]
    assert not [n for n, k in described.items() if k["schedule"] != SCHEDULE and ("matmul" in n or "multiply" in n)]
    assert_built_like_onnxruntime(kernels, target, model)


@pytest.mark.parametrize("batch, rows, depth, cols, transposed, scale", [
    (2, 31, 16, 37, True, 0.5),  # rows: whole register tiles and a remainder; a short last vector
    (3, 29, 20, 32, False, 1.0),  # whole vectors: the right-hand side read as it is, not packed
    (2, 40, 33, 50, False, 1.0),  # padded columns: packed with zeros
    (1, 1, 5, 3, True, -2.0),  # smaller than a vector and a tile
])
def test_the_batched_matmul_kernel_computes_every_product_of_any_shape(rng, batch, rows, depth, cols, transposed,
                                                                         scale):
    """The kernel alone against numpy, at shapes that exercise its tails: rows left over after
    whole register tiles, columns left over after whole vectors, right-hand sides stored
    transposed or not, with and without a scale."""
    from hwcompress.backend.batch_matmul import Product, batch_matmul_kernel
    from hwcompress.backend.stack_buffers import PIPELINE

    target = get_target("host").tvm_target()
    product = Product.of(batch, rows, depth, cols, transposed, scale)
    kernel = batch_matmul_kernel(product, VectorUnit.of(target)).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=target, tir_pipeline=PIPELINE)
    a = rng.normal(size=(batch, rows, depth)).astype(np.float32)
    b = rng.normal(size=(batch, cols, depth) if transposed else (batch, depth, cols)).astype(np.float32)
    want = scale * (a @ (b.transpose(0, 2, 1) if transposed else b))
    got = tvm.runtime.tensor(np.full(want.shape, np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), got)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_hand_written_kernels_of_several_shapes_build_into_one_library(rng):
    """Two softmaxes, two LayerNorms, two LSTMs and two attention products of different shapes in
    one model (a text recognizer's stacked LSTMs, a transformer's stages): each shape its own
    kernel, all in one library (they once all took their kind's name as the exported symbol and
    the build refused the second), the result ONNX Runtime's."""
    steps, features, h1, h2 = 6, 20, 16, 24
    nodes = [helper.make_node("Softmax", ["x"], ["s1"], axis=-1),
             helper.make_node("LayerNormalization", ["s1", "g1", "b1"], ["n1"], axis=-1),
             helper.make_node("LSTM", ["n1", "w1", "r1", "bias1"], ["y1"], hidden_size=h1),
             helper.make_node("Squeeze", ["y1", "axis1"], ["l1"]),  # [steps, 1, h1]
             helper.make_node("LSTM", ["l1", "w2", "r2", "bias2"], ["y2"], hidden_size=h2),
             helper.make_node("Squeeze", ["y2", "axis1"], ["l2"]),  # [steps, 1, h2]
             helper.make_node("Reshape", ["l2", "rows"], ["t"]),  # [1, steps, h2]
             helper.make_node("Transpose", ["t"], ["tT"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "tT"], ["a1"]),  # [1, steps, steps]
             helper.make_node("MatMul", ["tT", "t"], ["a2"]),  # [1, h2, h2]
             helper.make_node("Softmax", ["a2"], ["s2"], axis=-1),
             helper.make_node("LayerNormalization", ["s2", "g2", "b2"], ["n2"], axis=-1),
             helper.make_node("MatMul", ["a1", "t"], ["u"]),  # [1, steps, h2]
             helper.make_node("MatMul", ["u", "n2"], ["y"])]

    def lstm_weights(inputs, hidden):
        return (rng.normal(0, 0.3, (1, 4 * hidden, inputs)), rng.normal(0, 0.3, (1, 4 * hidden, hidden)),
                rng.normal(0, 0.1, (1, 8 * hidden)))

    (w1, r1, bias1), (w2, r2, bias2) = lstm_weights(features, h1), lstm_weights(h1, h2)
    model = make_model(nodes, [("x", [steps, 1, features])], [("y", [1, steps, h2])],
                       {"g1": rng.uniform(0.5, 1.5, features), "b1": rng.normal(0, 0.1, features),
                        "g2": rng.uniform(0.5, 1.5, h2), "b2": rng.normal(0, 0.1, h2), "w1": w1, "r1": r1,
                        "bias1": bias1, "w2": w2, "r2": r2, "bias2": bias2, "axis1": np.array([1]),
                        "rows": np.array([1, steps, h2])})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model, VectorUnit.of(target.tvm_target())), target)
    hand_written = sorted(gv.name_hint for gv, f in kernels.functions.items()
                          if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "hwc.schedule" in f.attrs)
    assert hand_written == ["layer_norm", "layer_norm1", "lstm", "lstm1", "matmul", "matmul1", "matmul2", "matmul3",
                            "softmax", "softmax1"], hand_written
    assert_built_like_onnxruntime(kernels, target, model, tol=1e-4)


def test_rows_added_for_a_register_tile_are_carried_through_an_mlp(rng):
    """A transformer's MLP over 37 tokens (no register tile divides them: rows are appended):
    the bias and exact GELU after the first dense layer run in its epilogue on the padded rows and
    the second layer reads them as they are (no kernel slicing them off and padding them back);
    a scale per token stays after the slice, and a softmax across the tokens sees only the real
    rows: ONNX Runtime's result."""
    from hwcompress.backend.kernel_info import describe_kernels

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Div", ["hb", "sqrt2"], ["hs"]), helper.make_node("Erf", ["hs"], ["he"]),
             helper.make_node("Add", ["he", "one"], ["h1"]), helper.make_node("Mul", ["hb", "h1"], ["hm"]),
             helper.make_node("Mul", ["hm", "half"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["ob"]), helper.make_node("Mul", ["ob", "per_token"], ["ot"]),
             helper.make_node("Softmax", ["ot"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [1, 37, 32])], [("y", [1, 37, 32])],
                       {"w1": rng.normal(0, 0.3, (32, 48)), "b1": rng.normal(0, 0.5, 48), "sqrt2": np.array(2 ** 0.5),
                        "one": np.array(1.0), "half": np.array(0.5), "w2": rng.normal(0, 0.3, (48, 32)),
                        "b2": rng.normal(0, 0.5, 32), "per_token": rng.uniform(0.5, 2, (37, 1))})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    described = describe_kernels(kernels)
    convs = [k for k in described.values() if k["op"] == "conv2d"]
    assert len(convs) == 2 and any("erf" in k["fused"] for k in convs), described
    first = next(k for k in convs if "erf" in k["fused"])
    assert first["output"][2] > 37 and "strided_slice" not in first["fused"], first  # the padded rows kept
    assert [n for n, k in described.items() if "pad" in k["fused"] or k["op"] == "pad"] == \
        [n for n, k in described.items() if k["inputs"] == [[1, 37, 32]] and ("pad" in k["fused"] or k["op"] == "pad")]
    assert_built_like_onnxruntime(kernels, target, model)


@pytest.mark.parametrize("square, affine, axis", [("pow", True, -1), ("mul", False, -1), ("pow", True, 1)])
def test_a_layer_norm_written_out_below_opset_17_is_the_row_kernel(rng, square, affine, axis):
    """LayerNorm as exporters write it below opset 17 (ReduceMean, Sub, Pow or Mul, ReduceMean, Add,
    Sqrt, Div, then the scale's Mul and the shift's Add) over the last axis: one row kernel with
    the scale and shift taken in; over another axis left as the ops it is; ONNX Runtime's values
    either way, also for rows far from zero."""
    from hwcompress.backend.kernel_info import describe_kernels
    from hwcompress.backend.row_kernels import SCHEDULE

    shape = [2, 5, 40]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[axis], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["c"]),
             helper.make_node("Pow", ["c", "two"], ["c2"]) if square == "pow" else helper.make_node("Mul", ["c", "c"], ["c2"]),
             helper.make_node("ReduceMean", ["c2"], ["v"], axes=[axis], keepdims=1),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["c", "s"], ["n" if affine else "y"])]
    nodes += [helper.make_node("Mul", ["n", "g"], ["ng"]), helper.make_node("Add", ["ng", "b"], ["y"])] if affine else []
    constants = {"two": np.array(2.0), "eps": np.array(1e-5), "g": rng.uniform(0.5, 1.5, 40), "b": rng.normal(0, 0.1, 40)}
    model = make_model(nodes, [("x", shape)], [("y", shape)],
                       {k: v for k, v in constants.items() if k in {i for n in nodes for i in n.input}}, opset=13)
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    described = describe_kernels(kernels)
    rows = [k for k in described.values() if k["schedule"] == SCHEDULE]
    assert len(rows) == (axis == -1), described
    if axis == -1:  # nothing else computes: the other kernels only reshape
        assert all(k["op"] == "reshape" and not k["fused"] for k in described.values() if k not in rows), described
    assert_built_like_onnxruntime(kernels, target, model, tol=1e-5)
    far = {"x": (rng.normal(0, 0.01, shape) + 1000).astype(np.float32)}
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](tvm.runtime.tensor(far["x"])))
    assert ort.relative_error(ort.run(model, far), got) < 1e-2


def test_a_split_part_scaled_by_a_constant_builds(rng):
    """A half of a Split times a scalar (what a quantized ShuffleNet's dequantize of a channel split
    is): the batched-matmul rewrite, which looks for scaled products, reads a split's part as such
    and leaves it (an int8 ShuffleNet failed to build: 'TupleGetItem' object has no attribute 'op')."""
    nodes = [helper.make_node("Split", ["x", "halves"], ["keep", "work"], axis=1),
             helper.make_node("Mul", ["work", "half"], ["scaled"]),
             helper.make_node("Concat", ["keep", "scaled"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])],
                       {"halves": np.array([8, 8], np.int64), "half": np.array(0.5)})
    target = get_target("host")
    assert_built_like_onnxruntime(tvm_build.lower(import_onnx(model), target), target, model)
