"""A depthwise conv and the 1x1 conv reading it, one kernel per pixel tile (MobileNet's inverted
residual tail): merged where it applies, left as two kernels where it would not pay or not fit,
and exact against ONNX Runtime either way."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import helper
from tvm import relax

from conftest import assert_built_like_onnxruntime, make_model
from hwcompress.backend import build as tvm_build
from hwcompress.backend.importer import import_onnx
from hwcompress.backend.kernel_info import describe_kernels
from hwcompress.backend.runtime import outputs_to_numpy
from hwcompress.config import get_target
from hwcompress.model import reference as ort

MERGED = "depthwise conv2d + 1x1 conv2d"


def conv(x, w, y, bias=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [y], **attrs)


def block_models(rng):
    """name -> (model, merged kernels expected)."""
    w = lambda *shape: rng.normal(0, 0.2, shape)  # noqa: E731
    clip = {"lo": np.array(0.0), "hi": np.array(6.0)}
    return {
        # MobileNetV2's tail: depthwise 3x3 + bias + ReLU6, project 1x1 + bias + residual add.
        "ReLU6, residual": (make_model(
            [conv("x", "wd", "d", "bd", pads=[1, 1, 1, 1], group=64), helper.make_node("Clip", ["d", "lo", "hi"], ["a"]),
             conv("a", "wp", "p", "bp"), helper.make_node("Add", ["p", "r"], ["y"])],
            [("x", [1, 64, 12, 12]), ("r", [1, 16, 12, 12])], [("y", [1, 16, 12, 12])],
            {"wd": w(64, 1, 3, 3), "bd": w(64), "wp": w(16, 64, 1, 1), "bp": w(16), **clip}), 1),
        # Stride 2, HardSwish spelled out between the two convs (the depthwise output read twice
        # inside the merged kernel), 24 depthwise and 40 output channels (8-lane vectors on
        # AVX-512), an odd map (15 -> 8).
        "stride 2, HardSwish, 24 -> 40 channels": (make_model(
            [conv("x", "wd", "d", "bd", pads=[1, 1, 1, 1], strides=[2, 2], group=24),
             helper.make_node("Add", ["d", "three"], ["t"]), helper.make_node("Clip", ["t", "lo", "hi"], ["g"]),
             helper.make_node("Mul", ["d", "g"], ["m"]), helper.make_node("Div", ["m", "hi"], ["a"]),
             conv("a", "wp", "y", "bp")],
            [("x", [1, 24, 15, 15])], [("y", [1, 40, 8, 8])],
            {"wd": w(24, 1, 3, 3), "bd": w(24), "wp": w(40, 24, 1, 1), "bp": w(40), "three": np.array(3.0), **clip}), 1),
        # ShuffleNet's: a 1x3 depthwise with bias only (no activation), a 1x1 conv + ReLU.
        "1x3 kernel, bias only": (make_model(
            [conv("x", "wd", "a", "bd", pads=[0, 1, 0, 1], group=96), conv("a", "wp", "p", "bp"),
             helper.make_node("Relu", ["p"], ["y"])],
            [("x", [1, 96, 10, 10])], [("y", [1, 32, 10, 10])],
            {"wd": w(96, 1, 1, 3), "bd": w(96), "wp": w(32, 96, 1, 1), "bp": w(32)}), 1),
        # 1x1 weights (128 x 128) outweigh the 4x4 map: each pixel tile would re-read them all.
        "weights outweigh the map": (make_model(
            [conv("x", "wd", "d", "bd", pads=[1, 1, 1, 1], group=128), helper.make_node("Relu", ["d"], ["a"]),
             conv("a", "wp", "y", "bp")],
            [("x", [1, 128, 4, 4])], [("y", [1, 128, 4, 4])],
            {"wd": w(128, 1, 3, 3), "bd": w(128), "wp": w(128, 128, 1, 1) * 0.3, "bp": w(128)}), 0),
        # The depthwise output is also read by the residual add: it must be written whole.
        "depthwise output read twice": (make_model(
            [conv("x", "wd", "d", "bd", pads=[1, 1, 1, 1], group=32), helper.make_node("Relu", ["d"], ["a"]),
             conv("a", "wp", "p", "bp"), helper.make_node("Add", ["p", "a"], ["y"])],
            [("x", [1, 32, 12, 12])], [("y", [1, 32, 12, 12])],
            {"wd": w(32, 1, 3, 3), "bd": w(32), "wp": w(32, 32, 1, 1), "bp": w(32)}), 0),
    }


@pytest.mark.parametrize("name", list(block_models(np.random.default_rng(0))))
def test_depthwise_then_pointwise_is_one_kernel_where_it_pays_and_exact(name):
    model, merged = block_models(np.random.default_rng(0))[name]
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    by_name = describe_kernels(kernels)
    described = by_name.values()
    fused = [k for k in described if k["op"] == MERGED]
    assert len(fused) == merged, [k["op"] for k in described]
    for name, kernel in by_name.items():
        if kernel["op"] == MERGED:
            assert kernel["schedule"] == "hwc register-blocked"
            # The 1x1 weights are repacked per channel tile when compiling, as in the separate conv.
            assert name.endswith("_prepacked")
    # Without the merge both convs are still on the hand-written schedule.
    convs = [k for k in described if "conv" in k["op"]]
    assert len(convs) == 2 - merged and all(k["schedule"] == "hwc register-blocked" for k in convs)
    assert_built_like_onnxruntime(kernels, target, model)


def test_int8_depthwise_then_pointwise_is_one_kernel_with_the_qdq_graphs_values():
    """In an int8 model the depthwise conv reads 8-bit activations, computes in float and
    requantizes; merged, its 8-bit tile feeds the 1x1 conv's integer dot product. Values: ONNX
    Runtime's of the QDQ graph as written, up to float rounding in the last scale."""
    from hwcompress.backend.int8_conv_schedule import dot_product_intrinsics
    from hwcompress.backend.int8_lowering import lower_qdq
    from hwcompress.data.calibration import Calibration
    from hwcompress.compress.quantize import quantize_model

    target = get_target("host")
    if not dot_product_intrinsics(target.tvm_target()):
        pytest.skip("this CPU has no integer dot product")
    rng = np.random.default_rng(2)
    model = make_model(
        [conv("x", "w0", "e"), helper.make_node("Relu", ["e"], ["re"]),
         conv("re", "wd", "d", "bd", pads=[1, 1, 1, 1], group=64), helper.make_node("Relu", ["d"], ["a"]),
         conv("a", "wp", "y", "bp")],
        [("x", [1, 16, 12, 12])], [("y", [1, 16, 12, 12])],
        {"w0": rng.normal(0, 0.3, (64, 16, 1, 1)), "wd": rng.normal(0, 0.3, (64, 1, 3, 3)),
         "bd": rng.normal(0, 0.1, 64), "wp": rng.normal(0, 0.2, (16, 64, 1, 1)), "bp": rng.normal(0, 0.1, 16)})
    feeds = [{"x": rng.normal(0, 1, (1, 16, 12, 12)).astype(np.float32)} for _ in range(8)]
    quantized, _ = quantize_model(model, Calibration(feeds, "synthetic"), "int8", "minmax")
    mod, _ = lower_qdq(import_onnx(quantized))
    kernels = tvm_build.lower(mod, target)
    merged = [k for k in describe_kernels(kernels).values() if k["op"] == MERGED]
    assert len(merged) == 1 and merged[0]["schedule"] == "hwc register-blocked"
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    session = ort.session(quantized, exact=True)
    for feed in feeds[:3]:
        got = outputs_to_numpy(vm["main"](tvm.runtime.tensor(feed["x"])))[0]
        want = session.run(None, feed)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
