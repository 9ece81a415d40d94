"""BatchNorm folding is exact: every rewritten model matches the original through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_same_outputs, bn_node, bn_params, make_model, op_count, shared_model
from hwcompress.model.examples import mobilenetv2, resnet18
from hwcompress.model.loading import load_model
from hwcompress.passes import fold_batchnorm, run_canonical


@pytest.mark.parametrize("build", [resnet18, mobilenetv2], ids=["resnet18", "mobilenetv2"])
def test_generated_models_fold_every_bn_exactly(build):
    model = build(input_size=64, classes=100)
    assert op_count(model, "BatchNormalization") > 10
    result = fold_batchnorm.apply(model)
    folded = result.model
    onnx.checker.check_model(folded, full_check=True)
    assert op_count(folded, "BatchNormalization") == 0
    assert op_count(folded, "Mul") == 0, "every BN here follows a Conv and must fold into it"
    assert all("folded into Conv" in line for line in result.log.applied)
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("name", ["mnist-8", "squeezenet1.1-caffe2", "mobilenetv2-fp32"])
def test_canonical_passes_keep_real_models_exact(name):
    original = onnx.load(str(shared_model(name)))
    loaded = load_model(shared_model(name))
    folded, logs = run_canonical(loaded)
    onnx.checker.check_model(folded, full_check=True)
    assert {log.name for log in logs} == {"eliminate_identity", "fold_batchnorm", "canonicalize_reshape",
                                          "conv1d_as_conv2d", "explicit_pads", "convtranspose_as_conv",
                                          "channel_multiplier_as_depthwise", "space_to_depth_as_conv", "gather_as_slice",
                                          "einsum_as_matmul"}
    assert not any(a.name == "auto_pad" and a.s != b"NOTSET" for n in folded.graph.node for a in n.attribute)
    assert op_count(folded, "Dropout") == op_count(folded, "Identity") == 0
    assert_same_outputs(original, folded)


def test_real_squeezenet_matches_its_reference_output():
    """Not only self-consistent: the folded SqueezeNet reproduces the upstream reference output."""
    folder = shared_model("squeezenet1.1-caffe2").parent / "test_data_set_0"
    x = onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "input_0.pb")))
    ref = onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "output_0.pb")))
    folded, _ = run_canonical(load_model(shared_model("squeezenet1.1-caffe2")))
    from hwcompress.model import reference as ort

    (got,) = ort.run(folded, {folded.graph.input[0].name: x})
    assert np.abs(got - ref).max() < 1e-3
    assert got.argmax() == ref.argmax()


@pytest.mark.parametrize("group,bias", [(1, True), (1, False), (4, False), (8, True)])
def test_bn_after_conv_any_group_with_or_without_bias(rng, group, bias):
    cin, cout = 8, 16
    inits = {"w": rng.normal(0, 1, (cout, cin // group, 3, 3)), **bn_params(rng, "bn", cout)}
    conv_inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.normal(0, 1, cout)
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=group, strides=[2, 2]),
             bn_node("c", "y", "bn")]
    model = make_model(nodes, [("x", [2, cin, 9, 9])], [("y", [2, cout, 5, 5])], inits)
    folded = fold_batchnorm(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.output[0].name == "y", "a folded BN that was a graph output keeps the output name"
    assert_same_outputs(model, folded, tol=1e-5)


def test_shared_conv_weight_is_not_corrupted(rng):
    """Two Convs share one weight; folding the BN after one must not change the other."""
    inits = {"w": rng.normal(0, 1, (4, 4, 1, 1)), **bn_params(rng, "bn", 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"]), bn_node("c1", "y1", "bn"),
             helper.make_node("Conv", ["x", "w"], ["y2"])]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y1", [1, 4, 5, 5]), ("y2", [1, 4, 5, 5])], inits)
    assert_same_outputs(model, fold_batchnorm(model), tol=1e-5)


@pytest.mark.parametrize("trans_b,with_c,beta", [(0, False, 1.0), (1, True, 1.0), (1, True, 0.5)])
def test_bn_after_gemm(rng, trans_b, with_c, beta):
    k, m = 12, 6
    inits = {"B": rng.normal(0, 1, (m, k) if trans_b else (k, m)), **bn_params(rng, "bn", m)}
    inputs = ["a", "B"] + (["C"] if with_c else [])
    if with_c:
        inits["C"] = rng.normal(0, 1, m)
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=beta), bn_node("g", "y", "bn")]
    model = make_model(nodes, [("a", [3, k])], [("y", [3, m])], inits)
    folded = fold_batchnorm(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert_same_outputs(model, folded, tol=1e-5)


@pytest.mark.parametrize("with_add", [True, False])
def test_bn_after_matmul_and_bias(rng, with_add):
    inits = {"W": rng.normal(0, 1, (10, 5)), "bias": rng.normal(0, 1, 5), **bn_params(rng, "bn", 5)}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["mm"])]
    if with_add:
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["z"]))
    nodes.append(bn_node("z" if with_add else "mm", "y", "bn"))
    model = make_model(nodes, [("a", [4, 10])], [("y", [4, 5])], inits)
    folded = fold_batchnorm(model)
    assert op_count(folded, "BatchNormalization") == 0 and op_count(folded, "Mul") == 0
    assert_same_outputs(model, folded, tol=1e-5)


def test_bn_after_add_folds_forward_into_unpadded_grouped_conv(rng):
    inits = {**bn_params(rng, "bn", 8), "w": rng.normal(0, 1, (4, 4, 1, 1)), "b": rng.normal(0, 1, 4)}
    nodes = [helper.make_node("Add", ["x1", "x2"], ["s"]), bn_node("s", "n", "bn"),
             helper.make_node("Conv", ["n", "w", "b"], ["y"], group=2)]
    model = make_model(nodes, [("x1", [1, 8, 6, 6]), ("x2", [1, 8, 6, 6])], [("y", [1, 4, 6, 6])], inits)
    result = fold_batchnorm.apply(model)
    assert [n.op_type for n in result.model.graph.node] == ["Add", "Conv"]
    assert "forward" in result.log.applied[0]
    assert_same_outputs(model, result.model, tol=1e-5)


def test_bn_before_padded_conv_becomes_mul_add(rng):
    """Zero padding would see the BN shift, so folding forward is not exact: Mul + Add instead."""
    inits = {**bn_params(rng, "bn", 4), "w": rng.normal(0, 1, (4, 4, 3, 3))}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n", "bn"),
             helper.make_node("Conv", ["n", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 4, 6, 6])], inits)
    folded = fold_batchnorm(model)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Mul", "Add", "Conv"]
    assert_same_outputs(model, folded, tol=1e-5)


def test_bn_with_computed_parameters_is_left_alone_and_reported(rng):
    inits = bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Relu", ["bn_g"], ["gamma"]),
             helper.make_node("BatchNormalization", ["x", "gamma", "bn_b", "bn_m", "bn_v"], ["y"])]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])], inits)
    result = fold_batchnorm.apply(model)
    assert op_count(result.model, "BatchNormalization") == 1
    assert "not constants" in result.log.skipped[0]
