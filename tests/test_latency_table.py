"""Per-layer latency tables: real one-layer TVM builds, timed here, cached, and shared with whole models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model
from hwcompress.model import reference as ort
from hwcompress.backend import build as tvm_build
from hwcompress.backend.importer import import_onnx
from hwcompress.backend.tune import has_record
from hwcompress.backend.tuning_db import open_database
from hwcompress.config.targets import get_target
from hwcompress.backend.cpu_schedules import is_scheduled
from hwcompress.model.examples import mobilenetv2, resnet18
from hwcompress.measure.cycle_model import modelled_latency
from hwcompress.model.graph import Graph
from hwcompress.backend.build import BuildOptions, build_model
from hwcompress.measure.latency import Job
from hwcompress.search.latency_table import ANCHOR, LatencyTable
from hwcompress.search.layer_spec import model_layers
from hwcompress.passes import run_canonical


@pytest.fixture(scope="module")
def small_resnet():
    return run_canonical(resnet18(input_size=32, classes=10))[0]


def test_layer_specs_carry_the_fused_epilogue_and_run(small_resnet):
    specs = model_layers(small_resnet)
    convs = [s for s in specs.values() if s.op == "Conv"]
    assert len(specs) == 21 and len(convs) == 20
    epilogues = {s.epilogue for s in convs}
    assert (("Relu",),) in epilogues and (("Add",), ("Relu",)) in epilogues  # plain and residual blocks
    residual = next(s for s in convs if s.epilogue == (("Add",), ("Relu",)))
    model = residual.to_model()
    feeds = residual.feeds()
    assert list(feeds) == ["X", "R"] == residual.input_names
    (out,) = ort.run(model, feeds)
    assert out.shape == feeds["R"].shape and out.min() >= 0.0  # Relu after the residual Add
    clipped = [s for s in model_layers(run_canonical(mobilenetv2(input_size=32, classes=10))[0]).values()
               if s.epilogue and s.epilogue[0][0] == "Clip"]
    assert clipped and clipped[0].epilogue[0] == ("Clip",) and clipped[0].clip_bounds[0] == (0.0, 6.0)
    other = replace(clipped[0], clip_bounds=((0.0, 1.5),))  # bounds do not change latency: one entry
    assert other == clipped[0] and other.key() == clipped[0].key()
    (out,) = ort.run(other.to_model(), other.feeds())  # but the layer keeps its own bounds
    assert out.max() <= 1.5 and out.max() > 1.0
    # Layers that differ only in how attributes are spelled (defaults, kernel_shape) share an entry.
    stem = next(n for n in small_resnet.graph.node if n.op_type == "Conv")
    spelled = onnx.ModelProto()
    spelled.CopyFrom(small_resnet)
    node = next(n for n in spelled.graph.node if n.name == stem.name)
    kept = [a for a in node.attribute if a.name not in ("kernel_shape", "dilations", "group")]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute("group", 1)])
    assert model_layers(spelled)[stem.name] == specs[stem.name]


@pytest.mark.timed  # the table against a layer timed alone
def test_table_is_timed_once_and_shared_across_models(tmp_path, small_resnet):
    target = get_target("host")
    table = LatencyTable(target, tmp_path, trials=0)
    total, per_layer = table.predict_ms(small_resnet)
    distinct = len(set(model_layers(small_resnet).values()))
    assert table.measured == distinct and total == pytest.approx(sum(per_layer.values())) and total > 0
    saved = json.loads(table.cache.path.read_text())
    assert len(saved) == distinct + 1 and all(v["method"] == "local" and v["median_ms"] > 0 for v in saved.values())
    # Figures are on the anchor kernel's scale (kept with them), and that scale is milliseconds:
    # the slowest layer timed alone now reads what the table says, within the machine's drift
    # (this VM switches between two speeds about 1.8x apart: 0.20 vs 0.11 ms seen across a switch).
    assert f"anchor|{ANCHOR.key()}" in saved
    slowest = max(model_layers(small_resnet).values(), key=lambda spec: table.latencies([spec])[spec])
    library = build_model(slowest.to_model(channels_last=True), target, BuildOptions(tune_trials=0, cache_dir=tmp_path),
                          tmp_path).library
    alone = Job("alone", library, slowest.feeds(channels_last=True), slowest.input_names, None)
    fastest = min(table.measurer.measure(alone).latency.median_ms for _ in range(3))  # as the anchor's figure is
    assert 0.4 < table.latencies([slowest])[slowest] / fastest < 2.5

    again = LatencyTable(target, tmp_path, trials=0)  # a second run: everything from the file
    assert again.predict_ms(small_resnet)[1] == per_layer and again.measured == 0
    # A wider ResNet shares only the stem's input shape; its new shapes are timed, nothing else.
    wide = run_canonical(resnet18(input_size=32, classes=10, width=0.5))[0]
    other = LatencyTable(target, tmp_path, trials=0)
    other.predict_ms(wide)
    shared = set(model_layers(wide).values()) & set(model_layers(small_resnet).values())
    assert other.measured == len(set(model_layers(wide).values())) - len(shared)
    # Another tuning budget is another figure, in the same file.
    assert LatencyTable(target, tmp_path, trials=0).cache.path == LatencyTable(target, tmp_path, trials=8).cache.path
    # Direct convs (--no-winograd) or float QDQ layers are other kernels: figures of their own.
    for other_build in ({"winograd": False}, {"int8_compute": False}):
        assert LatencyTable(target, tmp_path, **other_build).cache.path != table.cache.path


def test_cpu_layers_are_timed_without_the_layout_transposes_of_a_model_alone(small_resnet):
    """A CPU build computes convs in NHWC: a one-layer ONNX model (NCHW) would be built with a
    transpose at each edge, which inside a model are not there and cost more than a large layer's conv.
    The channels-last one-layer model computes the same layer, and builds to its conv kernel alone."""
    target = get_target("host")
    residual = next(s for s in model_layers(small_resnet).values() if s.epilogue == (("Add",), ("Relu",)))
    plain, last = residual.feeds(), residual.feeds(channels_last=True)
    assert list(last) == residual.input_names
    assert all(last[name].shape == tuple(np.transpose(plain[name], (0, 2, 3, 1)).shape) for name in plain)
    nchw = {name: np.ascontiguousarray(np.transpose(last[name], (0, 3, 1, 2))) for name in last}
    (expected,) = ort.run(residual.to_model(), nchw)
    (got,) = ort.run(residual.to_model(channels_last=True), last)
    np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), expected, rtol=1e-5, atol=1e-5)

    def kernels(model):
        return [gv.name_hint for gv in tvm_build.lower(import_onnx(model), target).functions if gv.name_hint != "main"]

    assert any("transpose" in k for k in kernels(residual.to_model()))
    built = kernels(residual.to_model(channels_last=True))
    assert built and not any("transpose" in k for k in built) and any("conv2d" in k for k in built)
    # A matrix layer has no layout to change. An int8 layer keeps its input's quantization (a pass
    # over the input in the model too), with no transpose kernel of its own beside it.
    gemm = next(s for s in model_layers(small_resnet).values() if s.op != "Conv")
    assert gemm.to_model(channels_last=True) == gemm.to_model()
    int8 = kernels(residual.as_int8(False).to_model(channels_last=True))
    assert len(int8) == 2 and not any(k.startswith("transpose") for k in int8)


def test_a_depthwise_layer_is_priced_with_the_1x1_conv_built_into_its_kernel(tmp_path):
    """CPU builds compute a depthwise conv and the 1x1 conv reading it as one kernel: the depthwise
    layer's figure is that pair's less the 1x1 conv's alone, so the model's sum holds the pair once."""
    model = run_canonical(mobilenetv2(input_size=32, classes=10))[0]
    layers = model_layers(model)
    graph = Graph(model)
    depthwise = [n.name for n in graph.nodes if n.op_type == "Conv" and n.name in layers
                 and graph.initializer(n.input[1]).shape[1] == 1]
    pairs = {name: spec for name, spec in layers.items() if spec.reader is not None}
    assert depthwise and sorted(pairs) == sorted(depthwise)  # each read by its block's project conv alone
    spec = next(s for s in pairs.values() if "R" in s.reader.input_names)  # a residual block's
    assert spec.reader in layers.values() and spec.reader.reader is None
    assert spec.input_names == ["X", "r_R"] and "> Conv" in spec.describe()
    # The pair's model is the depthwise layer, then its reader, on the layer's own feeds.
    feeds = spec.feeds(channels_last=True)
    (pair,) = ort.run(spec.to_model(channels_last=True), feeds)
    (first,) = ort.run(replace(spec, reader=None).to_model(channels_last=True), {"X": feeds["X"]})
    (second,) = ort.run(spec.reader.to_model(channels_last=True), {"X": first, "R": feeds["r_R"]})
    np.testing.assert_allclose(pair, second, rtol=1e-5, atol=1e-5)
    assert spec.as_int8(False).reader == spec.reader.as_int8(False)  # int8 pairs merge too
    table = LatencyTable(get_target("host"), tmp_path, trials=0)
    figures = table.latencies([spec, spec.reader])
    saved = json.loads(table.cache.path.read_text())
    assert len(saved) == 3  # the anchor, the pair, the reader alone
    assert figures[spec] == pytest.approx(saved[table._entry_key(spec)]["median_ms"] - figures[spec.reader])
    # A cycle model merges nothing: the depthwise layer is priced alone there.
    cycles = LatencyTable(get_target("npu16"), tmp_path)
    assert cycles.latencies([spec])[spec] == cycles.latencies([replace(spec, reader=None)])[replace(spec, reader=None)]


def test_tuning_the_table_tunes_the_models_own_kernels(tmp_path, rng):
    """Each layer is built with its fused epilogue, so its tuned kernel is the whole model's. (The
    grouped conv with 3 channels per group is one the project's schedules leave to MetaSchedule.)"""
    target = get_target("host")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=2),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    model = run_canonical(make_model(nodes, [("x", [1, 1, 8, 8])], [("y", [1, 10])],
                                     {"w1": rng.normal(0, 1, (8, 1, 3, 3)), "w2": rng.normal(0, 1, (6, 4, 3, 3)),
                                      "fw": rng.normal(0, 1, (10, 384))}))[0]
    table = LatencyTable(target, tmp_path, trials=2)
    table.predict_ms(model)
    import tvm.s_tir.meta_schedule as ms

    kernels = tvm_build.cpu_kernels(import_onnx(model), target.tvm_target())
    hand_scheduled = [gv for gv, f in kernels.functions.items() if is_scheduled(f)]  # the convs: not tuned
    tasks = [t for t in ms.relax_integration.extract_tasks(kernels, target.tvm_target())
             if not is_scheduled(t.dispatched[0]["main"])]
    layer_tasks = [t for t in tasks if "conv2d" in t.task_name or "matmul" in t.task_name]
    assert len(layer_tasks) + len(hand_scheduled) == len(model_layers(model)) == 3
    assert layer_tasks
    database = open_database(table.db_dir)
    assert all(has_record(database, t, target.tvm_target()) for t in layer_tasks)


def test_npu16_table_is_its_cycle_model(tmp_path, small_resnet):
    target = get_target("npu16")
    table = LatencyTable(target, tmp_path)
    _, per_layer = table.predict_ms(small_resnet)
    _, rows = modelled_latency(small_resnet, target)
    modelled = {r["layer"]: r["cycles"] / (target.latency.model.clock_mhz * 1e3) for r in rows}
    # A layer's entry is the layer and the elementwise ops fused into it (its epilogue), as the cycle
    # model prices them inside the whole model.
    graph, specs = Graph(small_resnet), model_layers(small_resnet)
    expected = {}
    for name, spec in specs.items():
        node, total = graph.node(name), modelled[name]
        for _ in spec.epilogue:
            node = graph.sole_consumer(node.output[0])
            total += modelled[node.name]
        expected[name] = total
    assert any(spec.epilogue for spec in specs.values())
    assert per_layer == pytest.approx(expected)
    assert all(v["method"] == "model" for v in json.loads(table.cache.path.read_text()).values())
    # pow2 entries: 4-bit weights pay off only where moving weights, not MACs, bounds the layer.
    from hwcompress.search.candidates import pow2_layers_faster

    fc = next(name for name, spec in specs.items() if spec.op == "Gemm")
    stem = next(iter(specs))  # 3 -> 64 channels at full resolution: MAC-bound
    faster = pow2_layers_faster(small_resnet, table, symmetric=True)
    assert fc in faster and stem not in faster
    pow2 = table.latencies([specs[fc].as_pow2(), specs[fc].as_int8(True)])
    assert pow2[specs[fc].as_pow2()] < pow2[specs[fc].as_int8(True)]


def test_cross_target_without_device_is_refused(tmp_path):
    from hwcompress.errors import HwcError

    with pytest.raises(HwcError, match="timed on a device"):
        LatencyTable(get_target("arm-a72"), tmp_path)


def test_layer_macs_match_the_shapes_onnx_infers(small_resnet):
    from hwcompress.model.graph import Graph

    graph = Graph(small_resnet)
    graph.infer_shapes()
    for node in graph.nodes:
        spec = model_layers(small_resnet).get(node.name)
        if spec is None:
            continue
        out = graph.shape(node.output[0])
        per_output = int(np.prod(spec.weight_shape)) // out[1]  # MACs per output value
        assert spec.macs == int(np.prod(out)) * per_output, node.name


def test_budget_stops_optional_shapes_never_the_models_own(tmp_path, small_resnet):
    target = get_target("host")
    table = LatencyTable(target, tmp_path, trials=0, budget_s=0)
    total, _ = table.predict_ms(small_resnet)  # the model's own layers: always timed
    assert total > 0 and table.spent_s == 0 and not table.budget_left()  # not counted against the budget
    wide = run_canonical(resnet18(input_size=32, classes=10, width=0.5))[0]
    layers = model_layers(wide)
    assert table.predict_layers_ms(layers) is None  # new shapes, budget spent: not priced
    measured = table.measured
    priced = table.latencies(layers.values(), within_budget=True)
    assert table.measured == measured and set(priced) <= set(model_layers(small_resnet).values())
    assert table.predict_layers_ms(model_layers(small_resnet)) == pytest.approx(total)  # known shapes still priced
    # The cycle model is not budgeted: it costs nothing.
    npu = LatencyTable(get_target("npu16"), tmp_path, budget_s=0)
    assert npu.predict_layers_ms(layers) > 0
