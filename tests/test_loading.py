"""Loading canonicalizes good models and refuses bad ones with one clear line."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_same_outputs, make_model, shared_model
from hwcompress.errors import HwcError
from hwcompress.model.loading import ASSUMED_BATCH, CANONICAL_OPSET, load_model, parse_input_shapes


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("name,old_opset", [("mnist-8", 8), ("squeezenet1.1-caffe2", 7)])
def test_old_opsets_are_converted_and_stay_exact(name, old_opset):
    original = onnx.load(str(shared_model(name)))
    assert _opset(original) == old_opset
    loaded = load_model(shared_model(name))
    assert _opset(loaded) == CANONICAL_OPSET
    weights = {t.name for t in loaded.graph.initializer}
    assert not weights & {v.name for v in loaded.graph.input}, "initializers are not graph inputs"
    onnx.checker.check_model(loaded, full_check=True)
    assert_same_outputs(original, loaded)


@pytest.mark.parametrize("opset", [18, 20, 21])
def test_ops_newer_than_opset_17_load_as_the_ops_they_equal(tmp_path, rng, opset):
    """Exports at opsets after 17 with ops ONNX's version converter cannot bring back to 17: Split
    by ``num_outputs`` (10 channels into 4, 4, 2) and by sizes, Mish, GroupNormalization (its scale
    and shift per group before opset 21, per channel from 21) and at opset 20 Gelu in both forms.
    They load (once refused: "cannot convert opset 18 to 17") and compute what ONNX Runtime
    computes on the model as given."""
    groups, channels = 2, 10
    per = groups if opset < 21 else channels
    split = (helper.make_node("Split", ["x"], ["s0", "s1", "s2"], axis=1, num_outputs=3),
             helper.make_node("Split", ["x", "sizes"], ["t0", "t1"], axis=1))
    nodes = [*split, helper.make_node("Concat", ["s2", "s0", "s1"], ["c"], axis=1),
             helper.make_node("Mish", ["c"], ["m"]),
             helper.make_node("GroupNormalization", ["m", "scale", "bias"], ["g"], num_groups=groups, epsilon=1e-5),
             helper.make_node("Concat", ["t1", "t0"], ["t"], axis=1), helper.make_node("Add", ["g", "t"], ["y"])]
    if opset >= 20:
        nodes[-1] = helper.make_node("Add", ["g", "t"], ["z"])
        nodes += [helper.make_node("Gelu", ["z"], ["e"]), helper.make_node("Gelu", ["e"], ["y"], approximate="tanh")]
    graph = helper.make_graph(nodes, "newer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
                              [numpy_helper.from_array(np.array([3, 7], np.int64), "sizes"),
                               numpy_helper.from_array(rng.uniform(0.5, 2, per).astype(np.float32), "scale"),
                               numpy_helper.from_array(rng.normal(0, 1, per).astype(np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # (onnx's checker refuses GroupNormalization before 21 as deprecated; exporters wrote it)
    path = tmp_path / "newer.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    assert _opset(loaded) == CANONICAL_OPSET
    assert not {n.op_type for n in loaded.graph.node} & {"Split", "Mish", "GroupNormalization", "Gelu"}
    assert_same_outputs(model, loaded, tol=1e-5)


@pytest.mark.parametrize("opset", [18, 21, 22])
def test_ops_the_converter_has_no_adapter_for_pass_through_it(tmp_path, rng, opset):
    """Pad (with the ``axes`` input of opset 18), ConstantOfShape, LpPool, GridSample (its opset-20
    mode names) and GlobalMaxPool (22) have no adapter down to opset 17 in ONNX's converter (every
    opset-18 model with a Pad was refused); used as opset 17 allows, they load and compute what
    ONNX Runtime computes; a ``wrap`` Pad (19) is refused in one line naming the node."""
    nodes = [helper.make_node("Pad", ["x", "pads", "", "axes"], ["p"], mode="reflect"),
             helper.make_node("LpPool", ["p"], ["l"], kernel_shape=[2, 2], p=2),
             helper.make_node("GridSample", ["l", "grid"], ["gs"], align_corners=1,
                              **({"mode": "linear"} if opset >= 20 else {})),
             helper.make_node("GlobalMaxPool", ["gs"], ["gm"]), helper.make_node("Add", ["gs", "gm"], ["l2"]),
             helper.make_node("Shape", ["l2"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["k"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["l2", "k"], ["y"])]
    graph = helper.make_graph(nodes, "parked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 7, 10])],
                              [numpy_helper.from_array(np.array([1, 2], np.int64), "pads"),
                               numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                               numpy_helper.from_array(rng.uniform(-1, 1, (1, 7, 10, 2)).astype(np.float32), "grid")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "parked.onnx")
    loaded = load_model(tmp_path / "parked.onnx")
    assert _opset(loaded) == CANONICAL_OPSET and {o.domain for o in loaded.opset_import} <= {"", "ai.onnx"}
    assert_same_outputs(model, loaded, tol=1e-6)
    wrap = helper.make_model(helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap", name="edge")],
                                               "wrap", graph.input, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 11])],
                                               [numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 0, 2], np.int64), "pads")]),
                             opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(wrap, tmp_path / "wrap.onnx")
    with pytest.raises(HwcError, match="Pad 'edge': mode 'wrap' .* no opset-17 form"):
        load_model(tmp_path / "wrap.onnx")


def test_model_zoo_folder_is_accepted():
    assert load_model(shared_model("mnist-8").parent).graph.node


def test_external_data_model_loads(tmp_path, rng):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 64])], [("y", [2, 64])],
                       {"w": rng.normal(0, 1, (64, 64))})
    path = tmp_path / "ext.onnx"
    onnx.save_model(copy.deepcopy(model), str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    assert (tmp_path / "ext.bin").stat().st_size >= 64 * 64 * 4
    loaded = load_model(path)
    assert_same_outputs(model, loaded)


def test_not_onnx_file_is_refused(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(HwcError, match="not (a valid ONNX file|an ONNX model)"):
        load_model(path)


def test_truncated_file_is_refused(tmp_path):
    data = shared_model("mnist-8").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HwcError, match="not a valid ONNX file|not an ONNX model|invalid ONNX model"):
        load_model(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(HwcError, match="no such file"):
        load_model(tmp_path / "absent.onnx")


def test_unsupported_op_is_named_with_its_node(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("QLinearSoftmax", ["q", "s", "z", "s", "z"], ["y"], domain="com.microsoft",
                          name="the_softmax")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 4])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(HwcError) as info:
        load_model(tmp_path / "m.onnx")
    message = str(info.value)
    assert "unsupported op com.microsoft.QLinearSoftmax at node the_softmax" in message
    assert "QLinearConv" in message  # the hint names the QOperator ops hwc does import
    assert "\n" not in message


def test_an_input_too_small_for_its_layers_is_refused_naming_the_layer(tmp_path, rng):
    """A 3x3 conv after a 4x4 pool of an 8x8 input has nothing to compute: said at load, with the
    layer and the empty shape, not as a division by zero inside TVM's build."""
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Conv", ["p", "w"], ["c"], name="conv3x3"),
             helper.make_node("GlobalAveragePool", ["c"], ["y"])]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [("x", [1, 1, 8, 8])], [("y", [1, 4, 1, 1])], {"w": rng.normal(0, 1, (4, 1, 3, 3))}), path)
    with pytest.raises(HwcError) as exc:
        load_model(path)
    assert "conv3x3" in str(exc.value) and "1x4x0x0" in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_custom_op_is_refused(tmp_path):
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy1", domain="example.org")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info("y", 1, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.org", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(HwcError, match="unsupported op example.org.FancyOp at node fancy1"):
        load_model(path)


def test_dynamic_shape_needs_input_shape(tmp_path, rng):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", 3, "H", 8])], [("y", ["N", 3, "H", 8])], {})
    path = tmp_path / "dyn.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(HwcError, match=r"dynamic shape.*--input-shape x=1x3x1x8"):
        load_model(path)
    loaded = load_model(path, parse_input_shapes(["x=2x3x8x8"]))
    assert [d.dim_value for d in loaded.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 8, 8]
    with pytest.raises(HwcError, match="contradicts"):
        load_model(path, {"x": [2, 4, 8, 8]})
    # Only the batch is dynamic: one sample, and it is recorded. Exporters write an unknown batch as
    # a name or as 0 (which ONNX Runtime would take literally): both are the same here.
    for batch in ("N", 0):
        only_batch = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [batch, 3, 8, 8])],
                                [("y", [batch, 3, 8, 8])], {})
        onnx.save_model(only_batch, str(tmp_path / "batch.onnx"))
        loaded = load_model(tmp_path / "batch.onnx")
        assert [d.dim_value for d in loaded.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8], batch
        assert {p.key: p.value for p in loaded.metadata_props}[ASSUMED_BATCH] == '["x"]'
    with pytest.raises(HwcError, match="inputs are: x"):
        load_model(path, {"image": [1, 3, 8, 8]})


@pytest.mark.parametrize("spec", ["x", "x=", "x=1x", "x=1xAx3", "=1x2", "x=0x3"])
def test_bad_input_shape_spec(spec):
    with pytest.raises(HwcError, match="--input-shape"):
        parse_input_shapes([spec])


def test_model_larger_than_memory_is_refused(monkeypatch):
    monkeypatch.setenv("HWC_MEMORY_LIMIT_BYTES", str(1 << 20))
    with pytest.raises(HwcError, match=r"needs about .* GiB of memory"):
        load_model(shared_model("squeezenet1.1-caffe2"))


def test_loading_does_not_fold_batchnorm(tmp_path):
    """BN must survive loading: pruning reads gamma before the fold pass removes it."""
    from hwcompress.model.examples import resnet18

    path = tmp_path / "r.onnx"
    onnx.save_model(resnet18(input_size=32, classes=10), str(path))
    loaded = load_model(path)
    assert sum(n.op_type == "BatchNormalization" for n in loaded.graph.node) == 20


def test_exporter_quirks_load_and_compile_like_a_plain_export(tmp_path, rng):
    """A Paddle-style export: weights as Constant nodes, a dynamic input, value_info and output shapes
    holding -1 from before the input was fixed. It loads with --input-shape and compiles to what ORT computes."""
    from conftest import hwc

    weight = numpy_helper.from_array(rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=weight),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8, -1, -1])],
                              value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [-1, 8, -1, -1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    path = tmp_path / "paddle.onnx"
    onnx.save_model(model, str(path))
    loaded = load_model(path, {"x": [1, 3, 16, 16]})
    assert not any(n.op_type == "Constant" for n in loaded.graph.node)
    assert [d.dim_value for d in loaded.graph.output[0].type.tensor_type.shape.dim] == [1, 8, 16, 16]
    result = hwc("compile", str(path), "--input-shape", "x=1x3x16x16", "-o", str(tmp_path / "out"),
                 "--tune-trials", "0", "--repeat", "3", "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"]["max_relative_error"] < 1e-4
