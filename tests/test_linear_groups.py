"""Narrowing a linear group of channels (a linear bottleneck's stream) in a basis chosen for it:
exact at full width, better than selecting channels where the stream has fewer real directions,
refused where an activation touches the group; checked with ONNX Runtime, and on MobileNetV2."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from conftest import SHARED, assert_same_outputs, hwc, make_model, shared_model
from hwcompress.data import datasets
from hwcompress.compress.fidelity import output_error
from hwcompress.compress.linear_groups import linear_group, narrow_groups
from hwcompress.compress.prune import prune_model
from hwcompress.data.calibration import Calibration
from hwcompress.model.graph import Graph
from hwcompress.model.loading import load_model
from hwcompress.passes import fold_batchnorm
from hwcompress.passes.channel_groups import analyze

STREAM = 12
IMAGENET = SHARED / "data" / "imagenet_samples_224" / "imagenet_samples_224_every4th_class.npz"


def _stream_model(rng, stream_rank: int = STREAM, clip: float = 1e4, activation: str | None = None,
                  read_rank: int = STREAM, kernel: int = 1):
    """conv -> relu -> 1x1 (the stream, 12 channels) -> [expand, relu, project] + stream -> + a
    per-channel constant -> Clip(+-clip) -> a strided reader (``kernel`` wide) and a 1x1 reader ->
    outputs. The stream's producers have rank ``stream_rank``: it spans that many directions."""
    directions = np.linalg.qr(rng.normal(0, 1, (STREAM, STREAM)))[0][:, :stream_rank]

    def low_rank(shape):  # every producer writes into the same directions
        return (directions @ rng.normal(0, 0.3, (stream_rank, int(np.prod(shape[1:]))))).reshape(shape)

    read = np.linalg.qr(rng.normal(0, 1, (STREAM, STREAM)))[0]
    seen, unseen = read[:, :read_rank] @ read[:, :read_rank].T, read[:, read_rank:] @ read[:, read_rank:].T

    def producer(shape):
        return np.einsum("ck,k...->c...", seen + 3 * unseen, low_rank(shape))

    def reader(shape):  # weights [outputs, stream, kh, kw] blind to the unseen directions
        return np.einsum("ok...,kc->oc...", rng.normal(0, 0.3, shape), seen)
    weights = {"w0": rng.normal(0, 0.3, (16, 3, 3, 3)), "b0": rng.normal(0, 0.1, 16),
               "wp": producer((STREAM, 16, 1, 1)), "bp": rng.normal(0, 0.1, STREAM),
               "we": reader((24, STREAM, 1, 1)), "be": rng.normal(0, 0.1, 24),
               "wq": producer((STREAM, 24, 1, 1)), "bq": rng.normal(0, 0.1, STREAM),
               "shift": rng.normal(0, 0.5, (1, STREAM, 1, 1)),
               "lo": np.array(-clip), "hi": np.array(clip),
               "wr": reader((10, STREAM, kernel, kernel)), "br": rng.normal(0, 0.1, 10),
               "ws": reader((6, STREAM, 1, 1)), "bs": rng.normal(0, 0.1, 6)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="stem_relu"),
             helper.make_node("Conv", ["ar", "wp", "bp"], ["s1"], name="project1"),
             helper.make_node("Conv", ["s1", "we", "be"], ["e"], name="expand"),
             helper.make_node("Relu", ["e"], ["er"], name="expand_relu"),
             helper.make_node("Conv", ["er", "wq", "bq"], ["q"], name="project2"),
             helper.make_node("Add", ["s1", "q"], ["s2"], name="residual"),
             helper.make_node("Add", ["s2", "shift"], ["s3"], name="shift"),
             helper.make_node("Clip", ["s3", "lo", "hi"], ["s4"], name="range_clip")]
    stream = "s4"
    if activation:
        nodes.append(helper.make_node(activation, ["s4"], ["s5"], name="act"))
        stream = "s5"
    nodes += [helper.make_node("Conv", [stream, "wr", "br"], ["y"], name="reader_strided", strides=[2, 2],
                               pads=[kernel // 2] * 4),
              helper.make_node("Conv", [stream, "ws", "bs"], ["z"], name="reader1x1")]
    return make_model(nodes, [("x", [1, 3, 10, 10])], [("y", [1, 10, 5, 5]), ("z", [1, 6, 10, 10])], weights)


def _feeds(rng, count: int):
    return [{"x": rng.normal(0, 1, (1, 3, 10, 10)).astype(np.float32)} for _ in range(count)]


def _group(model, first: str = "project1"):
    graph = Graph(model)
    cg = analyze(graph)
    group = next(g for g in cg.coupled_layers() if g[0] == first)
    return linear_group(graph, cg, group)


def test_full_width_basis_is_exact(rng):
    """Every direction kept: producers, the Add's constant, the dropped range Clip and the readers
    (one strided) rewritten in the new basis give the original outputs."""
    model = _stream_model(rng)
    group = _group(model)
    assert sorted(group.layers) == ["project1", "project2"]
    assert sorted(r for r, _ in group.readers) == ["expand", "reader1x1", "reader_strided"]
    assert group.constants == [("shift", 1)] and group.clips == ["range_clip"]
    narrowed, notes, done = narrow_groups(model, [(group, STREAM)], _feeds(rng, 8))
    assert done == [group]
    assert "12 -> 12 directions" in notes["project1"] and "1 range Clip(s) dropped" in notes["project1"]
    assert "Clip" not in {n.op_type for n in narrowed.graph.node}
    assert_same_outputs(model, narrowed, tol=1e-4)


def test_narrowing_keeps_the_directions_a_selection_cannot(rng):
    """A stream that spans 8 of its 12 channels: 8 directions lose (almost) nothing; 8 selected
    channels, refit the same way, lose much more."""
    model = _stream_model(rng, stream_rank=8)
    calibration = Calibration(_feeds(rng, 32), "test")
    ratios = {"project1": 0.3, "project2": 0.3}
    narrowed, report = prune_model(model, 0.0, 4, "reconstruction", ratios, calibration=calibration)
    selected, plain = prune_model(model, 0.0, 4, "reconstruction", ratios, calibration=calibration,
                                  narrow_linear=False)
    assert report["pruning"]["layers"]["project1"] == {"op": "Conv", "before": 12, "after": 8, "narrowed": True}
    assert plain["pruning"]["layers"]["project1"]["after"] == 8
    assert "12 -> 8 directions" in report["narrowed_groups"]["project1"] and report["narrowed"] == ["project1"]
    held = _feeds(np.random.default_rng(99), 8)
    error_narrowed, error_selected = output_error(model, narrowed, held), output_error(model, selected, held)
    assert error_narrowed < 1e-3, error_narrowed
    assert error_selected > 20 * max(error_narrowed, 1e-4), (error_narrowed, error_selected)
    assert narrowed.graph.initializer and Graph(narrowed).shape("s2")[1] == 8


def test_the_directions_kept_are_those_the_readers_see(rng):
    """A stream that varies in all 12 channels, most widely in 4 directions its readers ignore: 8
    directions chosen by what the readers compute lose (almost) nothing before any refit, where the
    stream's own widest directions (PCA) or 8 of its channels would lose most of what is read."""
    model = _stream_model(rng, read_rank=8)
    narrowed, notes, _ = narrow_groups(model, [(_group(model), 8)], _feeds(rng, 32))
    assert "explained on calibration data: 100.0%" in notes["project1"], notes
    error = output_error(model, narrowed, _feeds(np.random.default_rng(99), 8))
    assert error < 1e-3, error


def test_an_activation_a_cutting_clip_or_a_spatial_reader_keeps_the_group_to_selection(rng):
    relu = _group(_stream_model(rng, activation="Relu"))
    assert isinstance(relu, str) and "Relu act reads its channels" in relu
    # The readers' view weighs each kernel tap alone; neighbouring positions of real data are
    # correlated (a low-rank MNIST conv's 1x5 reader: 0.642 narrowed against 0.567 selected).
    spatial = _group(_stream_model(rng, kernel=3))
    assert spatial == "reader_strided reads its channels through a 3x3 kernel"
    tight = _stream_model(rng, clip=0.5)  # cuts most of the stream: an activation, not a range clip
    group = _group(tight)
    _, notes, done = narrow_groups(tight, [(group, 8)], _feeds(rng, 4))
    assert not done and notes["project1"].startswith("not narrowed: a Clip on it cuts")
    calibration = Calibration(_feeds(rng, 16), "test")
    pruned, report = prune_model(tight, 0.0, 4, "reconstruction", {"project1": 0.3, "project2": 0.3},
                                 calibration=calibration)
    assert "not narrowed" in report["narrowed_groups"]["project1"] and report["narrowed"] == []
    assert Graph(pruned).shape("s2")[1] == 12  # left whole, not narrowed and not selected


def test_a_chain_of_groups_is_narrowed_in_turns(rng):
    """1x1 convs a (16 -> 8) -> b (8 -> 6) -> c (6 -> 16) -> Relu, without activation between:
    b reads the first group and makes the second. a writes into 5 directions, b into 4: both
    groups narrowed to those lose (almost) nothing, b refit to the directions it now emits."""
    def into(rank, shape):
        return rng.normal(0, 1, (shape[0], rank)) @ rng.normal(0, 0.4, (rank, int(np.prod(shape[1:]))))
    weights = {"wa": into(5, (8, 16)).reshape(8, 16, 1, 1), "wb": into(4, (6, 8)).reshape(6, 8, 1, 1),
               "wc": rng.normal(0, 0.4, (16, 6, 1, 1)), "bb": rng.normal(0, 0.1, 6)}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="a"),
             helper.make_node("Conv", ["a", "wb", "bb"], ["b"], name="b"),
             helper.make_node("Conv", ["b", "wc"], ["c"], name="c"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [("x", [1, 16, 6, 6])], [("y", [1, 16, 6, 6])], weights)
    feeds = [{"x": rng.normal(0, 1, (1, 16, 6, 6)).astype(np.float32)} for _ in range(24)]
    pruned, report = prune_model(model, 0.0, 1, "reconstruction", {"a": 3 / 8, "b": 2 / 6},
                                 calibration=Calibration(feeds, "test"), match_statistics=False)
    assert sorted(report["narrowed"]) == ["a", "b"], report["narrowed_groups"]
    assert Graph(pruned).shape("a")[1] == 5 and Graph(pruned).shape("b")[1] == 4
    assert report["output_error"] < 1e-3, report["output_error"]


def test_a_low_rank_model_prunes_with_its_1x1_factor_narrowed(tmp_path):
    """MNIST factorized by ``hwc lowrank`` (a spatial kx1 -> 1xk pair and a Tucker-2 1x1 -> 5x5 ->
    1x1 chain), then pruned: the group read by a 1x1 (the Tucker core's outputs) is narrowed, the
    ones read through a spatial kernel are selected, and the result is checked as any pruning."""
    x, _ = datasets.mnist(SHARED / "data" / "mnist_t10k")
    np.savez(tmp_path / "calib.npz", Input3=x[:48])
    factored = hwc("lowrank", str(shared_model("mnist-8")), "--energy", "0.9", "--calib", str(tmp_path / "calib.npz"),
                   "-o", str(tmp_path / "lowrank.onnx"))
    assert factored.returncode == 0, factored.stderr
    model = onnx.load(tmp_path / "lowrank.onnx")
    calibration = Calibration([{"Input3": x[i:i + 1]} for i in range(48)], "mnist")
    pruned, report = prune_model(model, 0.2, 1, "reconstruction", calibration=calibration)
    _, selected = prune_model(model, 0.2, 1, "reconstruction", calibration=calibration, narrow_linear=False)
    assert report["narrowed"] == ["Convolution110_core_6"], report.get("narrowed_groups")
    assert report["output_error"] < 1.1 * selected["output_error"], (report["output_error"], selected["output_error"])
    assert output_error(model, pruned, [{"Input3": x[i:i + 1]} for i in range(100, 108)]) < 0.5


def test_mobilenetv2_stream_narrowed_loses_less_than_selected():
    """MobileNetV2's 64-channel stream (4 project convs, 3 Adds, range Clips) to 48: held-out error
    well below selecting 48 of its channels, both refit (24 ImageNet images: 18 fit, 6 held out)."""
    model = fold_batchnorm(load_model(shared_model("mobilenetv2-fp32")))
    images, _ = datasets.imagenet_samples(IMAGENET, "torch")
    calibration = Calibration([{model.graph.input[0].name: im[None]} for im in images[:24]], "imagenet")
    graph = Graph(model)
    group = next(g for g in analyze(graph).coupled_layers() if len(g) == 4)
    ratios = dict.fromkeys(group, 0.25)
    narrowed, report = prune_model(model, 0.0, 16, "reconstruction", ratios, calibration=calibration,
                                   match_statistics=False)
    _, plain = prune_model(model, 0.0, 16, "reconstruction", ratios, calibration=calibration,
                           match_statistics=False, narrow_linear=False)
    assert all(report["pruning"]["layers"][layer]["after"] == 48 for layer in group)
    assert report["output_error"] < 0.85 * plain["output_error"], (report["output_error"], plain["output_error"])


def test_prune_command_narrows_unless_asked_to_select(tmp_path, rng):
    """``hwc prune`` says which groups it narrowed; ``--select-only`` selects their channels instead."""
    model = _stream_model(rng, stream_rank=8)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in _feeds(rng, 32)]))
    common = ["prune", str(tmp_path / "m.onnx"), "--ratio", "0", "--layer-ratio", "project1=0.3",
              "--layer-ratio", "project2=0.3", "--calib", str(tmp_path / "calib.npz")]
    narrowed = hwc(*common, "-o", str(tmp_path / "narrowed.onnx"))
    assert narrowed.returncode == 0, narrowed.stderr
    assert "project1: 12 -> 8 (narrowed)" in narrowed.stdout
    assert "group of project1: 12 -> 8 directions" in narrowed.stdout
    selected = hwc(*common, "--select-only", "-o", str(tmp_path / "selected.onnx"))
    assert selected.returncode == 0, selected.stderr
    assert "project1: 12 -> 8" in selected.stdout and "narrowed" not in selected.stdout
    errors = [float(r.stdout.split("output error ")[1].split()[0]) for r in (narrowed, selected)]
    assert errors[0] < errors[1] / 5, errors


def test_mobilenetv3_streams_are_narrowed_at_a_whole_model_ratio():
    """The generated MobileNetV3-style network (SE blocks, HardSwish, batch norm after every conv,
    as `hwc prune` reads it; 64x64 input, random weights and inputs): a quarter of every layer
    pruned narrows its four linear streams (BN folded into their producers first; down to 2x2
    positions: few samples per channel), and the whole loses less than with their channels
    selected (measured 0.231 vs 0.248)."""
    from hwcompress.model.examples import mobilenetv3

    model = mobilenetv3(input_size=64)
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(0)
    calibration = Calibration([{"input": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}
                               for _ in range(24)], "random")
    _, narrowed = prune_model(model, 0.25, 8, "reconstruction", calibration=calibration)
    _, selected = prune_model(model, 0.25, 8, "reconstruction", calibration=calibration, narrow_linear=False)
    notes = narrowed["narrowed_groups"]
    assert len(notes) == 4 and all(" directions (" in note for note in notes.values()), notes
    assert narrowed["output_error"] < 0.95 * selected["output_error"], (narrowed["output_error"],
                                                                         selected["output_error"])
    assert narrowed["parameters_before"] == selected["parameters_before"] > narrowed["parameters_after"]
