"""Identity/Dropout removal, Reshape canonicalization, explicit pads, 1-D layers as 2-D ones,
ConvTranspose as a conv + pixel shuffle, space-to-depth folded into the conv reading it: exact
rewrites, checked with ONNX Runtime."""

from __future__ import annotations

import numpy as np
from onnx import helper

from conftest import assert_same_outputs, make_model, op_count
import pytest

from hwcompress.passes import (canonicalize_reshape, channel_multiplier_as_depthwise, conv1d_as_conv2d,
                               convtranspose_as_conv, einsum_as_matmul, eliminate_identity, explicit_pads,
                               gather_as_slice, space_to_depth_as_conv)


def test_identity_and_dropout_removed_even_before_a_graph_output(rng):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"]), helper.make_node("Identity", ["d"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], {})
    out = eliminate_identity(model)
    assert [n.op_type for n in out.graph.node] == ["Relu"] and out.graph.output[0].name == "y"
    assert_same_outputs(model, out)


def test_identity_from_input_to_output_is_kept():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", [2])], [("y", [2])], {})
    result = eliminate_identity.apply(model)
    assert op_count(result.model, "Identity") == 1 and result.log.skipped


def test_dropout_with_used_mask_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"]), helper.make_node("Cast", ["mask"], ["m"], to=1)]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3]), ("m", [2, 3])], {})
    assert op_count(eliminate_identity(model), "Dropout") == 1


def test_a_gather_of_one_constant_index_becomes_a_slice():
    """timm's ``qkv[0]`` (a scalar index: the axis dropped), ``x[:, -1:]`` written as a Gather of
    [-1] (the axis kept), exactly; a Gather of two indices stays."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Gather", ["r", "zero"], ["q"], axis=0),
             helper.make_node("Gather", ["r", "last"], ["k"], axis=-2),
             helper.make_node("Gather", ["r", "two"], ["v"], axis=1)]
    model = make_model(nodes, [("x", [3, 4, 5, 6])], [("q", [4, 5, 6]), ("k", [3, 4, 1, 6]), ("v", [3, 2, 5, 6])],
                       {"zero": np.array(0, np.int64), "last": np.array([-1], np.int64),
                        "two": np.array([1, 3], np.int64)})
    result = gather_as_slice.apply(model)
    assert op_count(result.model, "Gather") == 1 and op_count(result.model, "Slice") == 2
    assert op_count(result.model, "Squeeze") == 1 and len(result.log.applied) == 2
    assert_same_outputs(model, result.model, tol=1e-12)
    outside = make_model([helper.make_node("Gather", ["x", "three"], ["y"], axis=0)], [("x", [3, 4])], [("y", [4])],
                         {"three": np.array(3, np.int64)})
    result = gather_as_slice.apply(outside)  # an index past the axis is the model's error: left for the checks
    assert op_count(result.model, "Gather") == 1 and result.log.skipped


@pytest.mark.parametrize("equation, shapes", [
    ("bihd,bjhd->bhij", ([2, 7, 3, 5], [2, 9, 3, 5])),  # attention scores, heads kept apart
    ("bhij,bjhd->bihd", ([2, 3, 7, 9], [2, 9, 3, 5])),  # scores times values, heads joined back
    ("ik,kj->ij", ([4, 6], [6, 5])),  # a plain product: no transposes
    ("bn,bm->bnm", ([3, 4], [3, 2])),  # outer products: nothing summed
    ("ij,jk->ki", ([4, 6], [6, 5])),  # the result transposed
])
def test_an_einsum_of_two_tensors_becomes_a_batched_matmul(rng, equation, shapes):
    """Attention written with einsum, a plain product, outer products, a transposed result: one
    MatMul between transposes and reshapes, the values ONNX Runtime's Einsum computes (to float32
    rounding: the same products, summed in the MatMul's order)."""
    out = list(np.einsum(equation, *(np.zeros(s) for s in shapes)).shape)
    model = make_model([helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)],
                       [("a", shapes[0]), ("b", shapes[1])], [("y", out)], {}, opset=13)
    result = einsum_as_matmul.apply(model)
    assert op_count(result.model, "Einsum") == 0 and op_count(result.model, "MatMul") == 1
    assert_same_outputs(model, result.model, tol=1e-5)


@pytest.mark.parametrize("equation, shapes", [("ii->i", ([4, 4],)), ("ij,ij->", ([3, 4], [3, 4])),
                                              ("ij,jk,kl->il", ([2, 3], [3, 4], [4, 5])),
                                              ("bij,bjk->bik", ([1, 3, 4], [5, 4, 2]))])
def test_einsums_that_are_no_single_product_stay(equation, shapes):
    """A diagonal, three operands, a broadcast batch stay Einsums; a sum over every axis of two
    tensors (a dot product) is a product with nothing kept: rewritten. The values stay ONNX
    Runtime's."""
    names = [f"x{i}" for i in range(len(shapes))]
    out = list(np.einsum(equation, *(np.zeros(s) for s in shapes)).shape)
    model = make_model([helper.make_node("Einsum", names, ["y"], equation=equation)], list(zip(names, shapes)),
                       [("y", out)], {}, opset=13)
    result = einsum_as_matmul.apply(model)
    assert op_count(result.model, "Einsum") == (equation != "ij,ij->")
    assert_same_outputs(model, result.model, tol=1e-5)


def test_flattening_reshape_becomes_flatten(rng):
    inits = {"shape": np.array([2, 48]), "w": rng.normal(0, 1, (48, 5))}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", [2, 5])], inits)
    out = canonicalize_reshape(model)
    flatten = [n for n in out.graph.node if n.op_type == "Flatten"]
    assert len(flatten) == 1 and helper.get_attribute_value(flatten[0].attribute[0]) == 1
    assert_same_outputs(model, out)


def test_reshape_that_mixes_dimensions_is_kept(rng):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [6, 4])], {"shape": np.array([6, 4])})
    assert op_count(canonicalize_reshape(model), "Reshape") == 0  # [2*3, 4] is Flatten(axis=2)
    model2 = make_model(nodes, [("x", [2, 3, 4])], [("y", [4, 6])], {"shape": np.array([4, 6])})
    out = canonicalize_reshape(model2)
    assert op_count(out, "Reshape") == 1
    assert_same_outputs(model2, out)


def test_auto_pad_becomes_the_explicit_pads_it_stands_for(rng):
    """SAME_UPPER / SAME_LOWER put the odd pad on opposite sides; VALID pads nothing. Exact."""
    inits = {"W1": rng.normal(0, 1, (4, 3, 4, 3)), "W2": rng.normal(0, 1, (5, 4, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], auto_pad="SAME_UPPER", strides=[2, 1], name="up"),
             helper.make_node("MaxPool", ["a"], ["b"], auto_pad="SAME_LOWER", kernel_shape=[2, 2], name="pool"),
             helper.make_node("Conv", ["b", "W2"], ["y"], auto_pad="VALID", name="valid")]
    model = make_model(nodes, [("x", [1, 3, 9, 8])], [("y", [1, 5, 3, 6])], inits)
    result = explicit_pads.apply(model)
    pads = {n.name: list(helper.get_attribute_value(a) for a in n.attribute if a.name == "pads")[0]
            for n in result.model.graph.node}
    assert pads == {"up": [1, 1, 2, 1], "pool": [1, 1, 0, 0], "valid": [0, 0, 0, 0]}
    assert len(result.log.applied) == 3
    assert_same_outputs(model, result.model, tol=1e-6)


@pytest.mark.parametrize("kernel, bias", [((2, 2), True), ((2, 1), False), ((3, 3), True)])
def test_non_overlapping_convtranspose_becomes_a_1x1_conv_and_a_pixel_shuffle(rng, kernel, bias):
    kh, kw = kernel
    inits = {"w": rng.normal(0, 1, (6, 5, kh, kw))} | ({"b": rng.normal(0, 1, 5)} if bias else {})
    node = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if bias else []), ["y"], strides=[kh, kw])
    model = make_model([node], [("x", [1, 6, 7, 9])], [("y", [1, 5, 7 * kh, 9 * kw])], inits)
    result = convtranspose_as_conv.apply(model)
    assert op_count(result.model, "ConvTranspose") == 0 and op_count(result.model, "Conv") == 1
    assert_same_outputs(model, result.model, tol=1e-5)


@pytest.mark.parametrize("kernel, strides, pads, output_padding, groups", [
    ((4, 4), (2, 2), [1, 1, 1, 1], [0, 0], 1),   # DCGAN / FSRCNN-style 2x upsampling
    ((3, 3), (2, 2), [1, 1, 1, 1], [1, 1], 1),   # PyTorch's "same" 2x upsampling
    ((5, 3), (3, 2), [2, 0, 1, 3], [1, 0], 1),   # asymmetric everything
    ((3, 3), (1, 1), [3, 3, 3, 3], [0, 0], 1),   # a pad wider than the kernel
    ((4, 4), (2, 2), [1, 1, 1, 1], [0, 0], 4),   # depthwise (bilinear-style) upsampling
])
def test_overlapping_or_padded_convtranspose_becomes_a_conv_a_pixel_shuffle_and_a_crop(rng, kernel, strides,
                                                                                      pads, output_padding, groups):
    """Each output phase of a strided transposed conv is an ordinary conv with the taps that reach
    it: one conv to Co x sh x sw channels, shuffled into space, cropped by the padding. Exact."""
    kh, kw = kernel
    cout = 4 if groups > 1 else 3
    out = [(size - 1) * s + k - pads[i] - pads[i + 2] + output_padding[i]
           for i, (size, k, s) in enumerate(zip((5, 7), kernel, strides))]
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=list(strides), pads=pads,
                            output_padding=output_padding, group=groups)
    model = make_model([node], [("x", [1, 4, 5, 7])], [("y", [1, cout, *out])],
                       {"w": rng.normal(0, 1, (4, cout // groups, kh, kw)), "b": rng.normal(0, 1, cout)})
    result = convtranspose_as_conv.apply(model)
    assert op_count(result.model, "ConvTranspose") == 0 and op_count(result.model, "Conv") == 1
    assert_same_outputs(model, result.model, tol=1e-5)


def test_dilated_convtranspose_is_left_alone(rng):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], dilations=[2, 2])
    model = make_model([node], [("x", [1, 4, 5, 5])], [("y", [1, 3, 15, 15])], {"w": rng.normal(0, 1, (4, 3, 3, 3))})
    result = convtranspose_as_conv.apply(model)
    assert op_count(result.model, "ConvTranspose") == 1 and "dilated" in result.log.skipped[0]


@pytest.mark.parametrize("opset", [11, 17])
def test_a_stack_of_1d_layers_runs_on_4d_tensors_from_its_first_layer_to_its_last(rng, opset):
    """1-D conv, PReLU with a per-channel slope, max-pool, dilated conv, a residual Add, a scalar
    Mul, a transposed conv and global pooling: each layer becomes 2-D over [N, C, 1, L], the
    Squeezes move past the elementwise ops and cancel the next layer's Unsqueeze, so one Unsqueeze
    (the input) and one Squeeze (the output) are left. Exact (the Squeeze's axes as an input from
    opset 13, an attribute before)."""
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], strides=[2], pads=[2, 2]),
             helper.make_node("PRelu", ["a", "slope"], ["p"]),
             helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2], strides=[2]),
             helper.make_node("Conv", ["m", "wb"], ["b"], pads=[2, 2], dilations=[2]),
             helper.make_node("Add", ["b", "m"], ["r"]),
             helper.make_node("Mul", ["r", "half"], ["h"]),
             helper.make_node("ConvTranspose", ["h", "wt"], ["t"], strides=[2], pads=[1, 1]),
             helper.make_node("GlobalAveragePool", ["t"], ["y"])]
    model = make_model(nodes, [("x", [1, 4, 32])], [("y", [1, 3, 1])],
                       {"wa": rng.normal(0, 1, (6, 4, 5)), "ba": rng.normal(0, 1, 6), "slope": rng.uniform(0, 1, (6, 1)),
                        "wb": rng.normal(0, 1, (6, 6, 3)), "half": np.array(0.5), "wt": rng.normal(0, 1, (6, 3, 4))},
                       opset=opset)
    result = conv1d_as_conv2d.apply(model)
    assert len(result.log.applied) == 4 and not result.log.skipped
    assert op_count(result.model, "Unsqueeze") == 1 and op_count(result.model, "Squeeze") == 1
    layers = [n for n in result.model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MaxPool")]
    assert all(len(helper.get_attribute_value(a)) == 2 for n in layers for a in n.attribute
               if a.name in ("kernel_shape", "strides"))
    assert_same_outputs(model, result.model, tol=1e-5)
    as_conv = convtranspose_as_conv(result.model)  # the 1-D transposed conv, now 2-D, becomes a conv
    assert op_count(as_conv, "ConvTranspose") == 0
    assert_same_outputs(model, as_conv, tol=1e-5)


def test_a_1d_layer_read_by_an_op_that_cannot_move_keeps_its_squeeze(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1]),
             helper.make_node("Softmax", ["a"], ["s"], axis=-1),
             helper.make_node("Conv", ["s", "w"], ["y"], pads=[1, 1])]
    model = make_model(nodes, [("x", [1, 4, 16])], [("y", [1, 4, 16])], {"w": rng.normal(0, 1, (4, 4, 3))})
    result = conv1d_as_conv2d.apply(model)
    assert op_count(result.model, "Unsqueeze") == 2 and op_count(result.model, "Squeeze") == 2
    assert_same_outputs(model, result.model, tol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_a_channel_multiplier_becomes_a_repeated_input_a_depthwise_conv_and_a_shuffle(rng, bias):
    """Output channel c*m + j reads input channel c: the input repeated m times along channels
    (Concat), a depthwise conv over m*C channels, a channel shuffle back. Exact."""
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], group=8, strides=[2, 2],
                            pads=[1, 1, 1, 1])
    model = make_model([node], [("x", [1, 8, 9, 9])], [("y", [1, 24, 5, 5])],
                       {"w": rng.normal(0, 1, (24, 1, 3, 3))} | ({"b": rng.normal(0, 1, 24)} if bias else {}))
    result = channel_multiplier_as_depthwise.apply(model)
    (conv,) = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert [a.i for a in conv.attribute if a.name == "group"] == [24] and op_count(result.model, "Concat") == 1
    assert_same_outputs(model, result.model, tol=1e-5)


def test_a_depthwise_transposed_conv_ends_as_a_plain_depthwise_conv(rng):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], group=6)
    model = make_model([node], [("x", [1, 6, 7, 7])], [("y", [1, 6, 14, 14])], {"w": rng.normal(0, 1, (6, 1, 4, 4))})
    result = channel_multiplier_as_depthwise(convtranspose_as_conv(model))
    (conv,) = [n for n in result.graph.node if n.op_type == "Conv"]
    assert [a.i for a in conv.attribute if a.name == "group"] == [24]  # 6 channels x 4 phases, one input each
    assert_same_outputs(model, result, tol=1e-5)


def _focus_nodes(style: str) -> tuple[list, dict]:
    """YOLOv5/YOLOX Focus as exporters write it: ``x[..., dy::2, dx::2]`` for the four offsets, one
    two-axis Slice each ("joint") or torch's chain of one-axis Slices, rows then columns ("chained"),
    concatenated in YOLOv5's order."""
    nodes, inits = [], {"end": np.array([1 << 62]), "axis2": np.array([2]), "axis3": np.array([3]),
                        "step": np.array([2]), "o0": np.array([0]), "o1": np.array([1]),
                        "ends": np.array([1 << 62] * 2), "axes": np.array([2, 3]), "steps": np.array([2, 2])}
    for k, (dy, dx) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        if style == "joint":
            inits[f"s{k}"] = np.array([dy, dx])
            nodes.append(helper.make_node("Slice", ["x", f"s{k}", "ends", "axes", "steps"], [f"q{k}"]))
        else:
            nodes += [helper.make_node("Slice", ["x", f"o{dy}", "end", "axis2", "step"], [f"r{k}"]),
                      helper.make_node("Slice", [f"r{k}", f"o{dx}", "end", "axis3", "step"], [f"q{k}"])]
    return nodes + [helper.make_node("Concat", [f"q{k}" for k in range(4)], ["focus"], axis=1)], inits


@pytest.mark.parametrize("style", ["joint", "chained", "SpaceToDepth"])
@pytest.mark.parametrize("kernel,stride,pads", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_a_space_to_depth_read_by_a_conv_becomes_one_larger_strided_conv(rng, style, kernel, stride, pads):
    """YOLO's Focus (or a SpaceToDepth op) then a k x k conv is a 2k x 2k conv with twice the
    stride and pads over the input itself: no rearranged copy is left, exactly the same outputs."""
    if style == "SpaceToDepth":
        nodes, inits = [helper.make_node("SpaceToDepth", ["x"], ["focus"], blocksize=2)], {}
    else:
        nodes, inits = _focus_nodes(style)
    nodes.append(helper.make_node("Conv", ["focus", "w", "b"], ["y"], strides=[stride] * 2, pads=[pads] * 4))
    size = (16 + 2 * pads - kernel) // stride + 1
    model = make_model(nodes, [("x", [1, 3, 32, 32])], [("y", [1, 8, size, size])],
                       inits | {"w": rng.normal(0, 1, (8, 12, kernel, kernel)), "b": rng.normal(0, 1, 8)})
    result = space_to_depth_as_conv.apply(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"], result.log
    (conv,) = result.model.graph.node
    assert conv.input[0] == "x" and {a.name: list(a.ints) for a in conv.attribute if a.ints} == {
        "kernel_shape": [2 * kernel] * 2, "strides": [2 * stride] * 2, "pads": [2 * pads] * 4}
    assert f"{2 * kernel}x{2 * kernel} conv over x" in result.log.applied[0]  # what the report says
    assert_same_outputs(model, result.model, tol=1e-5)


def test_a_focus_read_by_more_than_a_conv_is_left_alone(rng):
    nodes, inits = _focus_nodes("joint")
    nodes += [helper.make_node("Conv", ["focus", "w"], ["y"], pads=[1] * 4), helper.make_node("Relu", ["focus"], ["r"])]
    model = make_model(nodes, [("x", [1, 3, 32, 32])], [("y", [1, 8, 16, 16]), ("r", [1, 12, 16, 16])],
                       inits | {"w": rng.normal(0, 1, (8, 12, 3, 3))})
    result = space_to_depth_as_conv.apply(model)
    assert op_count(result.model, "Slice") == 4 and result.log.skipped and not result.log.applied
    assert_same_outputs(model, result.model)
