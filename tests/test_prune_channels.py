"""Structured pruning: exact on zeroed channels across residual, depthwise and Concat structures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_same_outputs, bn_node, bn_params, make_model, op_count, shared_model
from hwcompress.errors import HwcError
from hwcompress.model.examples import mobilenetv2, resnet18
from hwcompress.model.graph import Graph
from hwcompress.model.loading import load_model
from hwcompress.passes import fold_batchnorm, prune_channels, run_canonical
from hwcompress.passes.channel_groups import analyze


def zero_channels(model: onnx.ModelProto, picks: list[tuple[str, int]]) -> tuple[onnx.ModelProto, dict]:
    """Zero the filters of the chosen output channels and of every channel coupled with them.

    Returns the zeroed model and, per layer, the channels removed with them (the exact pruning).
    """
    graph = Graph(model)
    cg = analyze(graph)
    classes = cg.classes()
    sources = {s.node: s for s in cg.sources}
    outs = {a.node: a for a in cg.actions if a.kind == "out"}
    removed: dict[str, list[int]] = {}
    for node_name, k in picks:
        for atom in classes[cg.find(sources[node_name].offset + k)]:
            source = cg.source_of(atom)
            action = outs[source.node]
            node = graph.node(source.node)
            weight = graph.initializer(node.input[action.input_index]).copy()
            index = [slice(None)] * weight.ndim
            index[action.axis] = atom - source.offset
            weight[tuple(index)] = 0.0
            graph.set_initializer(node.input[action.input_index], weight)
            removed.setdefault(source.node, []).append(atom - source.offset)
    return graph.to_model(), removed


def _prunable_layers(model: onnx.ModelProto) -> list[str]:
    graph = Graph(model)
    cg = analyze(graph)
    blocked = cg.blocked_roots()
    return [s.node for s in cg.sources if s.prunable and s.op_type != "input"
            and all(cg.find(a) not in blocked for a in range(s.offset, s.offset + s.channels))]


def _layer_weights(model: onnx.ModelProto) -> int:
    """Weights of Conv/Gemm/MatMul layers (constant maps added for exactness are not layers)."""
    graph = Graph(model)
    return sum(graph.initializer(n.input[1]).size for n in graph.nodes
               if n.op_type in ("Conv", "Gemm", "MatMul") and graph.is_constant(n.input[1]))


def _check_exact(model: onnx.ModelProto, picks_per_layer: int = 2, tol: float = 1e-4, seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = _prunable_layers(model)
    assert layers, "the model must have prunable layers"
    channels = {s.node: s.channels for s in analyze(Graph(model)).sources}
    picks = [(name, int(k)) for name in layers
             for k in rng.choice(channels[name], size=min(picks_per_layer, channels[name] - 1), replace=False)]
    zeroed, removed = zero_channels(model, picks)
    result = prune_channels.apply(zeroed, removed_atoms=removed)
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert _layer_weights(pruned) < _layer_weights(zeroed)
    assert_same_outputs(zeroed, pruned, tol=tol)
    return result


def test_exact_on_resnet_residual_groups():
    model = resnet18(input_size=32, classes=10, width=0.25)
    result = _check_exact(model)
    layers = result.log.details["layers"]
    # conv2 (stem) is coupled through the residual Adds with the whole first stage.
    assert layers["conv2"]["after"] == layers["conv19"]["after"] < layers["conv2"]["before"]


def test_exact_on_resnet_after_bn_folding():
    model = fold_batchnorm(resnet18(input_size=32, classes=10, width=0.25))
    _check_exact(model, picks_per_layer=3, seed=1)


def test_exact_on_mobilenetv2_depthwise_and_residual():
    model = mobilenetv2(input_size=32, classes=10, width=0.5)
    result = _check_exact(model, seed=2)
    pruned = Graph(result.model)
    for node in pruned.nodes:  # depthwise convs keep group == channels
        if node.op_type == "Conv" and pruned.attr(node, "group", 1) > 1:
            assert pruned.attr(node, "group") == pruned.initializer(node.input[1]).shape[0]


def _inception(rng) -> onnx.ModelProto:
    inits = {"w1": rng.normal(0, .3, (8, 3, 1, 1)), "b1": rng.normal(0, .5, 8),
             "w2": rng.normal(0, .3, (12, 3, 3, 3)), "b2": rng.normal(0, .5, 12),
             "w3": rng.normal(0, .3, (16, 20, 3, 3)), "b3": rng.normal(0, .5, 16),
             "w4": rng.normal(0, .3, (6, 16 * 4 * 4)), "b4": rng.normal(0, .1, 6), **bn_params(rng, "bn", 20)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Concat", ["a", "br"], ["cat"], axis=1),
             bn_node("cat", "catn", "bn"),
             helper.make_node("Conv", ["catn", "w3", "b3"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("MaxPool", ["cr"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], transB=1)]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("y", [1, 6])], inits)


def test_exact_on_concat_and_flatten_into_gemm(rng):
    model = _inception(rng)
    result = _check_exact(model, picks_per_layer=3)
    pruned = Graph(result.model)
    gemm = next(n for n in pruned.nodes if n.op_type == "Gemm")
    # The Gemm lost 3 channels of 4x4 features each.
    assert pruned.initializer(gemm.input[1]).shape == (6, 13 * 16)


def test_exact_on_real_squeezenet_fire_modules():
    model = load_model(shared_model("squeezenet1.1-caffe2"))
    model, _ = run_canonical(model)
    result = _check_exact(model, picks_per_layer=4, seed=3)
    assert op_count(result.model, "Concat") == 8


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_ratio_pruning_respects_the_channel_multiple(multiple):
    model = resnet18(input_size=32, classes=10, width=0.5)
    result = prune_channels.apply(model, ratio=0.4, multiple=multiple)
    onnx.checker.check_model(result.model, full_check=True)
    changed = [i for i in result.log.details["layers"].values() if i["after"] != i["before"]]
    assert changed
    for info in result.log.details["layers"].values():
        assert info["after"] > 0
        assert info["after"] == info["before"] or info["after"] % multiple == 0
    from hwcompress.model import reference as ort

    feeds = ort.random_inputs(model)
    assert ort.run(result.model, feeds)[0].shape == (1, 10)


def test_blocked_channels_are_reported():
    model = _inception(np.random.default_rng(0))
    graph = Graph(model)
    cg = analyze(graph)
    blocked = cg.blocked_roots()
    gemm = next(s for s in cg.sources if s.op_type == "Gemm")
    assert any("graph output" in blocked.get(cg.find(a), "") for a in range(gemm.offset, gemm.offset + 6))
    result = prune_channels.apply(model, ratio=0.5)
    assert any("graph output" in s for s in result.log.skipped)


def test_reshape_that_mixes_channels_blocks_pruning(rng):
    inits = {"w": rng.normal(0, 1, (8, 3, 1, 1)), "shape": np.array([1, 4, 2, 16])}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 4, 2, 16])], inits)
    with pytest.raises(HwcError, match="nothing prunable.*Reshape"):
        prune_channels(model, ratio=0.5)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(HwcError, match="between 0 and 1"):
        prune_channels(resnet18(input_size=32, classes=10, width=0.25), ratio=ratio)


def test_multiple_larger_than_every_layer():
    model = resnet18(input_size=32, classes=10, width=0.125)  # 8..64 channels
    with pytest.raises(HwcError, match="nothing prunable.*not more than the channel multiple 128"):
        prune_channels(model, ratio=0.5, multiple=128)


def test_a_layer_ratio_of_one_removes_its_residual_branch(rng):
    """ResNet-18's identity blocks are branches off their input (its downsampling blocks, whose Add
    reads two convs of the input, are not): ratio 1 on a block's first conv replaces the block by
    the constant given, ``x + f(x) -> x + c``, exactly, and the rest of the model is untouched."""
    from hwcompress.model import reference as ort
    from hwcompress.passes.residual_branches import leads_branches, residual_branches

    model = fold_batchnorm(resnet18(input_size=32, classes=10, width=0.25))
    graph = Graph(model)
    branches = residual_branches(graph)
    assert len(branches) == 5 and all(len(b.layers) == 2 for b in branches)
    adds = [n.name for n in graph.nodes if n.op_type == "Add"]
    assert len(adds) == 8 and {b.add for b in branches} < set(adds)
    branch = branches[2]
    # The group a ratio of 1 names: the one of the branch's first layer, not the residual group.
    assert leads_branches([branch.layers[0]], branches) and not leads_branches([branch.layers[1]], branches)
    constant = rng.normal(size=(1, *graph.shape(branch.tensor)[1:])).astype(np.float32)
    result = prune_channels.apply(model, ratio=0.0, layer_ratios={branch.layers[0]: 1.0},
                                  branch_constants={branch.add: constant})
    removed = result.model
    assert result.log.details["removed_branches"] == {branch.add: list(branch.layers)}
    assert {k: v["after"] for k, v in result.log.details["layers"].items()} == dict.fromkeys(branch.layers, 0)
    assert len(removed.graph.node) == len(model.graph.node) - len(branch.nodes)
    add_output = graph.node(branch.add).output[0]
    feeds = [ort.random_inputs(model, seed) for seed in range(2)]
    for before, after in zip(ort.run_with_intermediates(model, feeds, [branch.skip]),
                             ort.run_with_intermediates(removed, feeds, [add_output])):
        np.testing.assert_allclose(after[add_output], before[branch.skip] + constant, rtol=1e-5, atol=1e-5)
    # The other layers prune as before beside it; a layer on no branch cannot go whole.
    other = next(b for b in branches if b is not branch)
    both = prune_channels.apply(model, ratio=0.0, layer_ratios={branch.layers[0]: 1.0, other.layers[0]: 0.5})
    assert both.log.details["layers"][other.layers[0]]["after"] == both.log.details["layers"][other.layers[0]]["before"] // 2
    stem = next(n.name for n in graph.nodes if n.op_type == "Conv")
    with pytest.raises(HwcError, match="lies on no residual branch"):
        prune_channels(model, ratio=0.0, layer_ratios={stem: 1.0})


def test_exact_through_gelu_written_with_erf(rng):
    """A conv MLP with exact GELU as exporters write it (x * (erf(x / sqrt 2) + 1) * 0.5, the
    ConvNeXt/ViT form): its hidden channels are a group, pruned exactly."""
    weights = {"w1": rng.normal(0, 0.3, (16, 8, 1, 1)), "b1": rng.normal(0, 0.1, 16),
               "w2": rng.normal(0, 0.3, (8, 16, 1, 1)), "root2": np.array(np.sqrt(2.0)),
               "one": np.array(1.0), "half": np.array(0.5)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Div", ["h", "root2"], ["hd"]),
             helper.make_node("Erf", ["hd"], ["he"]),
             helper.make_node("Add", ["he", "one"], ["h1"]),
             helper.make_node("Mul", ["h", "h1"], ["hm"]),
             helper.make_node("Mul", ["hm", "half"], ["g"]),
             helper.make_node("Conv", ["g", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", [1, 8, 6, 6])], [("y", [1, 8, 6, 6])], weights)
    assert "fc1" in _prunable_layers(model)
    _check_exact(model, picks_per_layer=4)


def test_exact_on_a_transformer_mlp(rng):
    """A pre-norm transformer MLP over a sequence ([1, 10 steps, 16 features]: LayerNorm, MatMul +
    bias, exact GELU, MatMul + bias, residual Add): its 32 hidden features are the channels (the
    last axis, not the steps), pruned exactly, the removed features' bias carried into fc2's."""
    weights = {"gamma": np.ones(16), "beta": np.zeros(16), "w1": rng.normal(0, 0.3, (16, 32)),
               "b1": rng.normal(0, 0.5, 32), "w2": rng.normal(0, 0.3, (32, 16)), "b2": rng.normal(0, 0.1, 16),
               "root2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Div", ["h", "root2"], ["hd"]),
             helper.make_node("Erf", ["hd"], ["he"]),
             helper.make_node("Add", ["he", "one"], ["h1"]),
             helper.make_node("Mul", ["h", "h1"], ["hm"]),
             helper.make_node("Mul", ["hm", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["o0"], name="fc2"),
             helper.make_node("Add", ["o0", "b2"], ["o"]),
             helper.make_node("Add", ["o", "x"], ["y"])]
    model = make_model(nodes, [("x", [1, 10, 16])], [("y", [1, 10, 16])], weights)
    assert _prunable_layers(model) == ["fc1"]
    result = _check_exact(model, picks_per_layer=8)
    pruned = Graph(result.model)
    assert pruned.initializer(pruned.node("fc2").input[1]).shape == (24, 16)
