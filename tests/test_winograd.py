"""3x3 convolutions by Winograd F(2x2, 3x3): applied where it pays, with the epilogue fused, and
as exact as the direct conv against ONNX Runtime (float32 rounding only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from onnx import helper
from tvm import relax, te
from tvm.s_tir import Schedule

from conftest import hwc, make_model
from hwcompress.backend import build as tvm_build
from hwcompress.backend import winograd
from hwcompress.backend.cpu_schedules import VectorUnit, is_scheduled
from hwcompress.backend.importer import import_onnx
from hwcompress.backend.kernel_info import describe_kernels
from hwcompress.backend.runtime import outputs_to_numpy
from hwcompress.backend.stack_buffers import PIPELINE
from hwcompress.config import get_target
from hwcompress.model import reference as ort
from hwcompress.model.fileio import save_model

# Relative to the output's largest magnitude. Measured on single layers: F2 5e-7 .. 3e-6, F4
# 3e-6 .. 1.5e-5 (its transforms have coefficients up to 8); the compile check allows 1e-3.
TOLERANCE = 5e-5


def conv(x, w, y, bias=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [y], **attrs)


def chain_model(rng):
    """Three 3x3 convs as networks have them, batch 2: padded with an odd width (15: the last tile
    half outside) and bias + Relu; unpadded (valid) with SiLU; asymmetric padding with 40 output
    channels (no 16-lane tile) and a residual add of the previous conv's output."""
    w = lambda *shape: rng.normal(0, 0.1, shape)  # noqa: E731
    return make_model(
        [conv("x", "w1", "c1", "b1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
         conv("r1", "w2", "c2", "b2"), helper.make_node("Sigmoid", ["c2"], ["s2"]),
         helper.make_node("Mul", ["c2", "s2"], ["r2"]),
         conv("r2", "w3", "c3", "b3", pads=[0, 1, 2, 1]), helper.make_node("Relu", ["c3"], ["y"])],
        [("x", [2, 16, 15, 15])], [("y", [2, 40, 13, 13])],
        {"w1": w(32, 16, 3, 3), "b1": w(32), "w2": w(40, 32, 3, 3), "b2": w(40), "w3": w(40, 40, 3, 3),
         "b3": w(40)})


def winograd_kernels(kernels) -> dict[str, dict]:
    return {name: k for name, k in describe_kernels(kernels).items() if k["schedule"].startswith("hwc Winograd")}


@pytest.mark.parametrize("cache_bytes, tile", [(None, 2), (1 << 30, 4)])
def test_winograd_convs_fuse_their_epilogue_and_match_onnxruntime(rng, cache_bytes, tile):
    """13x13 and 15x15 maps have 16 tiles of 4x4: F(4x4, 3x3) where the weights stay in the
    cache, F(2x2, 3x3) where they may stream from memory (and where the cache is not known)."""
    model = chain_model(rng)
    target = get_target("host")
    with target.tvm_target():
        kernels = tvm_build.cpu_kernels(import_onnx(model), target.tvm_target(), cache_bytes=cache_bytes)
    found = winograd_kernels(kernels)
    assert len(found) == 3, describe_kernels(kernels)
    assert all(is_scheduled(kernels[name]) for name in found)
    assert all(k["op"] == "conv2d" and k["schedule"] == f"hwc Winograd F({tile}x{tile}, 3x3)" for k in found.values())
    assert sorted(tuple(k["fused"]) for k in found.values()) == sorted(
        [("add", "relu"), ("add", "sigmoid", "mul"), ("add", "relu")]), found
    feeds = ort.random_inputs(model, seed=1)
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))
    assert ort.relative_error(ort.run(model, feeds), got) < TOLERANCE


@pytest.mark.parametrize("channels", [17, 18])
def test_input_channel_counts_that_no_vector_divides(rng, channels):
    """A pruned layer's odd count: the input transform runs on 2 lanes, or 1."""
    model = make_model([conv("x", "w", "y", pads=[1, 1, 1, 1])], [("x", [1, channels, 12, 12])],
                       [("y", [1, 32, 12, 12])], {"w": rng.normal(0, 0.1, (32, channels, 3, 3))})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    assert len(winograd_kernels(kernels)) == 1
    feeds = ort.random_inputs(model, seed=1)
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))
    assert ort.relative_error(ort.run(model, feeds), got) < TOLERANCE


def test_a_small_model_on_this_machine_gets_f4_where_its_maps_have_16_tiles(rng):
    """``lower`` for the host knows its cache: this model's weights (60 KB) stay in it."""
    found = winograd_kernels(tvm_build.lower(import_onnx(chain_model(rng)), get_target("host")))
    assert {k["schedule"] for k in found.values()} == {"hwc Winograd F(4x4, 3x3)"}


@pytest.mark.parametrize("case, attrs, channels, out_size", [
    ("stride 2", {"pads": [1, 1, 1, 1], "strides": [2, 2]}, 16, 8),
    ("dilation 4: phases of 4x4 outputs", {"pads": [4, 4, 4, 4], "dilations": [4, 4]}, 16, 16),
    ("8 input channels: the input transform costs more than it saves", {"pads": [1, 1, 1, 1]}, 8, 16),
    ("5x5", {"pads": [2, 2, 2, 2]}, 16, 16),
])
def test_convs_where_winograd_does_not_apply_or_pay_stay_direct(rng, case, attrs, channels, out_size):
    size = 5 if case == "5x5" else 3
    model = make_model([conv("x", "w", "y", **attrs)], [("x", [1, channels, 16, 16])],
                       [("y", [1, 32, out_size, out_size])], {"w": rng.normal(0, 0.1, (32, channels, size, size))})
    kernels = tvm_build.lower(import_onnx(model), get_target("host"))
    assert not winograd_kernels(kernels)
    assert [k["schedule"] for k in describe_kernels(kernels).values() if k["op"] == "conv2d"] == ["hwc register-blocked"]


@pytest.mark.parametrize("shape, attrs, out_shape", [
    ([1, 16, 28, 28], {"pads": [2, 2, 2, 2], "dilations": [2, 2]}, [1, 32, 28, 28]),  # DeepLab's "same" conv
    ([2, 16, 31, 33], {"pads": [2, 1, 3, 4], "dilations": [2, 3]}, [2, 32, 32, 32]),  # 32 = 3 x 11 - 1: sliced
    ([1, 16, 30, 30], {"dilations": [3, 3]}, [1, 32, 24, 24]),  # unpadded
])
def test_dilated_convs_run_by_winograd_over_their_phases(rng, shape, attrs, out_shape):
    """A dilated 3x3 conv as one Winograd conv over the input's d x d phases (a batch of maps), its
    output interleaved back with the bias and Relu fused there: as exact as the direct conv."""
    model = make_model([conv("x", "w", "c", "b", **attrs), helper.make_node("Relu", ["c"], ["y"])],
                       [("x", shape)], [("y", out_shape)],
                       {"w": rng.normal(0, 0.1, (32, 16, 3, 3)), "b": rng.normal(0, 0.1, 32)})
    target = get_target("host")
    kernels = tvm_build.lower(import_onnx(model), target)
    dh, dw = attrs["dilations"]
    [found] = winograd_kernels(kernels).values()
    assert found["inputs"][0][0] == shape[0] * dh * dw, found  # the phases as a batch
    assert not [k for k in describe_kernels(kernels).values() if k["op"] == "conv2d" and k not in [found]]
    assert any(k["fused"][-2:] == ["add", "relu"] or {"add", "relu"} <= set(k["fused"])
               for k in describe_kernels(kernels).values() if k is not found)
    feeds = ort.random_inputs(model, seed=1)
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))
    assert ort.relative_error(ort.run(model, feeds), got) < TOLERANCE


def test_winograd_can_be_turned_off(rng, tmp_path):
    """``hwc compile --no-winograd``: the report's kernel table shows three direct convs."""
    save_model(chain_model(rng), tmp_path / "model.onnx")
    result = hwc("compile", str(tmp_path / "model.onnx"), "--target", "host", "--tune-trials", "0", "--repeat", "3",
                 "--no-winograd", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    schedules = [k["schedule"] for k in json.loads(result.stdout)["kernels"] if k["op"] == "conv2d"]
    assert schedules == ["hwc register-blocked"] * 3


@pytest.mark.parametrize("m", [2, 4])
def test_weight_transform_is_precomputed_in_the_kernels_tile_order(rng, m):
    """``U = G g G^T``, [O / tile][alpha^2][I][tile]: a channel tile's matrices contiguous; and
    the transforms compute the 1-D correlation exactly (``AT [(G g) . (BT d)]``)."""
    t = winograd.TRANSFORMS[m]
    weight = rng.normal(0, 1, (3, 3, 4, 32)).astype(np.float32)
    u = winograd.transform_weights(weight, 16, m)
    assert u.shape == (2, t.alpha ** 2, 4, 16)
    i, o = 3, 21  # one (input, output) channel pair, output channel 21 = tile 1, lane 5
    np.testing.assert_allclose(u[1, :, i, 5].reshape(t.alpha, t.alpha), t.g @ weight[:, :, i, o] @ t.g.T,
                               rtol=1e-5, atol=1e-6)
    d, g = rng.normal(0, 1, t.alpha), rng.normal(0, 1, 3)
    correlation = [d[k:k + 3] @ g for k in range(m)]
    np.testing.assert_allclose(t.at @ ((t.g @ g) * (t.bt @ d)), correlation, rtol=1e-12, atol=1e-12)


def test_an_epilogue_that_cannot_fuse_runs_in_passes_of_its_own(rng):
    """The fallback schedule (epilogue not in the output tile) computes the same result."""
    shape, channels = (1, 10, 10, 16), 32
    data, weight, out = winograd.winograd_conv2d_nhwc(shape, channels, (1, 1, 1, 1), 16, m=4)
    relu = te.compute(out.shape, lambda *i: te.max(out(*i), tvm.tirx.const(0.0, "float32")), name="relu")
    sch = Schedule(te.create_prim_func([data, weight, relu]))
    winograd._schedule(sch, VectorUnit.of(get_target("host").tvm_target()), fuse=False)
    target = get_target("host").tvm_target()
    with target:
        lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=target, tir_pipeline=PIPELINE).jit()
    x = rng.normal(0, 1, shape).astype(np.float32)
    w = rng.normal(0, 0.1, (3, 3, 16, channels)).astype(np.float32)
    result = tvm.runtime.tensor(np.zeros((1, 10, 10, channels), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(winograd.transform_weights(w, 16, m=4)), result)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    direct = sum(np.einsum("nhwi,io->nhwo", padded[:, a:a + 10, b:b + 10], w[a, b]) for a in range(3) for b in range(3))
    np.testing.assert_allclose(result.numpy(), np.maximum(direct, 0), rtol=1e-4, atol=1e-5)
