"""Latency-driven search: measured on the target, within the accuracy budget, with reports and budgets."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, assert_matches_report_schema, hwc, shared_model
from hwcompress.data import datasets


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    x, y = datasets.mnist(SHARED / "data" / "mnist_t10k")
    np.savez(folder / "calib.npz", Input3=x[:48])
    np.savez(folder / "val.npz", Input3=x[5000:5200])
    np.save(folder / "labels.npy", y[5000:5200])
    (folder / "profiles").mkdir()
    (folder / "profiles" / "quick.yaml").write_text(textwrap.dedent("""
        name: quick
        target: host
        accuracy_budget: {max_top1_drop: 1.0}
        search: {max_rounds: 2}
        passes:
          prune: {enabled: true, ratios: [0.2, 0.5], reconstruct: true, multiple: 2}
          lowrank: {enabled: true, energies: [0.9], methods: [svd, spatial, tucker2]}
          quantize: {enabled: true, schemes: [int8]}
    """))
    (folder / "profiles" / "layers.yaml").write_text(textwrap.dedent("""
        name: layers
        target: host
        accuracy_budget: {max_top1_drop: 1.0}
        search: {max_rounds: 1, layer_candidates: 2}
        passes:
          prune: {enabled: true, per_layer: true, ratios: [0.25, 0.5], reconstruct: true, multiple: 2}
          lowrank: {enabled: true, per_layer: true, energies: [0.9]}
          quantize: {enabled: true, schemes: [int8], per_layer: true}
    """))
    (folder / "profiles" / "nobudget.yaml").write_text(textwrap.dedent("""
        name: nobudget
        target: host
        search: {max_rounds: 1, table_budget_s: 0}
        passes:
          prune: {enabled: true, per_layer: true, ratios: [0.5], multiple: 2}
          lowrank: {enabled: true, per_layer: true, energies: [0.9]}
          quantize: {enabled: true, schemes: [int8], per_layer: true}
    """))
    # multiple 2: MNIST's convs (8 and 16 channels) are no wider than host's default multiple (its
    # CPU's vector lanes), which would leave them whole; 2 keeps what these ratios kept with 1.
    return folder


def test_spent_table_budget_leaves_steps_unpriced_and_unapplied(tmp_path, mnist_files):
    result = hwc("compile", str(shared_model("mnist-8")), "--target", "host", "--tune-trials", "0", "--profile",
                 "nobudget", "--profiles-dir", str(mnist_files / "profiles"), "--calib",
                 str(mnist_files / "calib.npz"), "--repeat", "5", "--cache-dir", str(tmp_path / "cache"), "--json",
                 "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    search = json.loads(result.stdout)["search"]
    assert search["latency_table"]["budget_s"] == 0 and search["latency_table"]["figures_made_in_this_run"] > 0
    steps = [t for t in search["trials"] if t["layers"]]
    assert steps and all(t["reason"].startswith("not priced") and t["predicted_ms"] is None for t in steps)
    # No int8 figure was made either, so every layer stays fp32 and int8 is not built.
    (int8,) = [t for t in search["trials"] if t["candidate"] == "int8 (per layer)"]
    assert int8["latency_ms"] is None and "it had the budget to time" in int8["reason"]
    assert search["applied"] == [] and "not priced (table budget spent)" in result.stderr


def test_a_spent_search_budget_stops_the_search_and_lists_what_it_left(tmp_path, mnist_files):
    """A cold search bounded by --search-seconds: the baseline alone takes longer than 1 s, so no
    candidate is built; each is a trial that says so, and the model is compiled uncompressed."""
    result = hwc("compile", str(shared_model("mnist-8")), "--target", "host", "--tune-trials", "0", "--profile",
                 "quick", "--profiles-dir", str(mnist_files / "profiles"), "--calib", str(mnist_files / "calib.npz"),
                 "--search-seconds", "1", "--repeat", "5", "--cache-dir", str(tmp_path / "cache"), "--json",
                 "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_matches_report_schema(report)
    search = report["search"]
    assert search["budget_s"] == 1 and search["spent_s"] >= 1 and "spent before round 1" in search["stopped"]
    left = [t for t in search["trials"] if t["latency_method"] == "budget"]
    assert {t["candidate"] for t in left} == {"prune 0.2", "prune 0.5", "lowrank 0.9", "int8"}
    assert all("time budget (1 s) was spent" in t["reason"] for t in left) and search["applied"] == []
    text = (tmp_path / "out" / "report.md").read_text()
    assert "4 candidate(s) left unevaluated" in text


def test_per_layer_search_follows_the_latency_table_and_checks_it_end_to_end(tmp_path, mnist_files):
    args = [str(shared_model("mnist-8")), "--target", "host", "--tune-trials", "0", "--profile", "layers",
            "--profiles-dir", str(mnist_files / "profiles"), "--calib", str(mnist_files / "calib.npz"),
            "--val", str(mnist_files / "val.npz"), "--labels", str(mnist_files / "labels.npy"), "--repeat", "3",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    result = hwc("compile", *args, "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_matches_report_schema(report)
    for text in (result.stdout, (tmp_path / "out" / "report.json").read_text()):
        json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # unscored: null
    search = report["search"]
    table, trials = search["latency_table"], search["trials"]
    assert table["method"] == "local" and table["figures_made_in_this_run"] > 0
    assert table["baseline_predicted_ms"] > 0  # the baseline's layers, summed
    steps = [t for t in trials[1:] if t["layers"]]
    assert steps and all(t["predicted_ms"] is not None for t in steps)
    # A prediction is the measured latency scaled by the table's change (never below zero, as the
    # measured latency less the table's saving was: the table's sums run about twice the real time).
    assert all(t["predicted_ms"] > 0 for t in steps)
    prunes = [t for t in steps if t["candidate"].startswith("prune ")]
    factorizations = [t for t in steps if t["candidate"].startswith("lowrank ")]
    assert prunes and factorizations  # both priced by the same table
    for t in prunes:
        for before, after in t["layers"].values():
            assert after < before
    # Scored steps were ranked by the table; only an end-to-end measurement lets one be applied.
    checked = [t for t in steps if t["latency_ms"] is not None]
    # A step applied and then superseded (the search ended with an earlier round's quantized model,
    # faster than where the rounds ended) is accepted but no longer chosen.
    ended_quantized = [t["round"] for t in trials if t["chosen"] and t["candidate"].startswith(("int8", "pow2"))]
    for t in checked:
        assert t["latency_method"] == "local"
        superseded = t["accepted"] and ended_quantized and ended_quantized[0] <= t["round"]
        assert t["chosen"] == t["accepted"] or (superseded and not t["chosen"] and "superseded" in t["reason"])
    chosen = [t for t in trials if t["chosen"]]
    assert [t["latency_ms"] for t in chosen] == sorted((t["latency_ms"] for t in chosen), reverse=True)
    assert search["applied"] == [t["candidate"] for t in chosen[1:]]
    assert not any(t["chosen"] for t in steps if t["latency_ms"] is None)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Per-layer latency table" in markdown and "| table predicts ms |" in markdown
    if checked:
        assert "Latency table vs end-to-end measurement" in (tmp_path / "out" / "report.html").read_text()
    # int8 is decided per layer from the table's int8 (lowered) and fp32 figures of each layer.
    int8 = [t for t in trials if t["candidate"] == "int8 (per layer)"]
    assert int8 and all(t["latency_method"] in ("local", "table") for t in int8)
    assert all("no faster than fp32" in t["reason"] for t in int8 if t["latency_method"] == "table")
    for t in int8:  # structure before precision: int8 wins a round only if no structural step survived it
        same_round = [o for o in trials if o["round"] == t["round"] and o is not t]
        ended_with_it = any("superseded" in (o["reason"] or "") for o in same_round)  # faster than the path taken
        if t["chosen"] and not ended_with_it:
            assert not [o for o in same_round if o["accepted"]]
    # [k/n] counters on stderr (a bar on a terminal) for each step scored, and the table's timing.
    # Which steps are worth scoring depends on the timings (the table may price every step below
    # the minimum gain), so the counters are checked for the steps this run did score.
    assert "latency table: timing" in result.stderr
    for t in steps:
        if t["accuracy"] is not None and t["round"] == 1:
            assert re.search(rf"\[\d+/\d+\] search round 1: {re.escape(t['candidate'])}: table predicts",
                             result.stderr), t["candidate"]
    # The figures are kept in the cache for the next run (a second run reading them all back is
    # test_latency_table's: this search's second run took half of this test's 70 s).
    saved = json.loads(Path(table["file"]).read_text())
    assert Path(table["file"]).is_relative_to(tmp_path / "cache")
    assert len(saved) > table["figures_made_in_this_run"]  # and the anchor kernel's figure


def test_search_keeps_only_measured_gains_within_budget(tmp_path, mnist_files):
    out = tmp_path / "out"
    result = hwc("compile", str(shared_model("mnist-8")), "--target", "host", "-o", str(out), "--tune-trials", "0",
                 "--profile", "quick", "--profiles-dir", str(mnist_files / "profiles"),
                 "--calib", str(mnist_files / "calib.npz"), "--val", str(mnist_files / "val.npz"),
                 "--labels", str(mnist_files / "labels.npy"), "--repeat", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_matches_report_schema(report)
    search = report["search"]
    trials = search["trials"]
    assert trials[0]["candidate"] == "baseline"
    assert {t["candidate"] for t in trials} >= {"prune 0.2", "prune 0.5", "lowrank 0.9", "int8"}
    for t in trials[1:]:
        if t["accepted"]:
            assert search["baseline_accuracy"] - t["accuracy"] <= 1.0
        else:
            assert t["reason"]
    # Every applied candidate made the measured latency lower, round after round.
    chosen = [t for t in trials if t["chosen"]]
    latencies = [t["latency_ms"] for t in chosen]
    assert latencies == sorted(latencies, reverse=True)
    assert search["latency_ms"] == latencies[-1]
    assert search["baseline_accuracy"] - search["accuracy"] <= 1.0
    assert search["accuracy_measured_on"] == "compiled artifact"
    # The final artifact is the chosen model, measured again.
    assert report["latency"]["median_ms"] > 0 and search["pareto"]
    html = (out / "report.html").read_text()
    # Plots: time per kernel of the artifact, the Pareto front, per-layer latency baseline vs chosen.
    assert html.count("<img") == 3 and "Pareto" in html and "Time per kernel" in html
    assert "## Search" in (out / "report.md").read_text()
    rejected_as_slower = [t for t in trials if "is not 2% below" in t["reason"]]
    assert all(not t["chosen"] for t in rejected_as_slower)


def test_budgets_exit_non_zero_after_writing_the_report(tmp_path, mnist_files):
    out = tmp_path / "out"
    result = hwc("compile", str(shared_model("mnist-8")), "-o", str(out), "--tune-trials", "0", "--repeat", "5",
                 "--max-latency-ms", "0.000001")
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.startswith("hwc: error:")]
    assert len(lines) == 1 and "exceeds --max-latency-ms 1e-06 by" in lines[0]
    assert (out / "report.json").exists() and (out / "report.html").exists()


def test_search_input_errors(tmp_path, mnist_files):
    result = hwc("compile", str(shared_model("mnist-8")), "-o", str(tmp_path / "o"), "--tune-trials", "0",
                 "--labels", str(mnist_files / "labels.npy"), "--calib", str(mnist_files / "calib.npz"))
    assert result.returncode == 2 and "--labels needs --val" in result.stderr
    result = hwc("compile", str(shared_model("mnist-8")), "-o", str(tmp_path / "o"), "--tune-trials", "0",
                 "--val", str(mnist_files / "calib.npz"), "--labels", str(mnist_files / "labels.npy"))
    assert result.returncode == 2 and "--labels has 200 entries for 48 validation samples" in result.stderr
    result = hwc("compile", str(shared_model("mnist-8")), "-o", str(tmp_path / "o"), "--search", "--tune-trials", "0")
    assert result.returncode == 2 and "needs inputs to score accuracy" in result.stderr
    assert not (tmp_path / "o").exists()


def test_compare_labels_every_latency_and_survives_a_failing_target(tmp_path):
    out = tmp_path / "cmp"
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "tpu9.yaml").write_text(  # a valid target whose build fails here: its toolchain is missing
        "name: tpu9\ndescription: a board whose cross compiler is not installed\n"
        "tvm: {target: {kind: llvm, mtriple: aarch64-linux-gnu}, cross_compiler: no-such-cross-g++}\n"
        "channel_multiple: 4\ndtypes: [float32]\nlatency: {method: rpc}\n")
    result = hwc("compare", str(shared_model("mnist-8")), "--targets", "host,npu16,arm-a72,tpu9", "-o", str(out),
                 "--tune-trials", "0", "--repeat", "5", "--json", "--targets-dir", str(targets))
    assert result.returncode == 4 and "1 of 4 target(s) failed (tpu9: target tpu9 needs the cross compiler" \
        in result.stderr, result.stderr
    rows = {r["target"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert rows["host"]["label"] == "measured" and rows["host"]["latency_ms"] > 0
    assert rows["npu16"]["label"] == "modelled" and rows["npu16"]["latency_ms"] > 0
    assert rows["arm-a72"]["label"] == "not measured" and rows["arm-a72"]["latency_ms"] is None
    assert rows["tpu9"]["label"] == "failed"
    markdown = (out / "comparison.md").read_text()
    assert "| host | none |" in markdown and "modelled" in markdown and "not measured" in markdown
    assert (out / "comparison.html").read_text().count("<img") == 1
    assert (out / "arm-a72" / "model.so").exists() and (out / "host" / "report.json").exists()


def test_npu16_gives_pow2_weights_only_where_its_cycle_model_prices_them_faster(tmp_path):
    from dataclasses import replace

    from hwcompress.data.calibration import Calibration
    from hwcompress.compile import CompileOptions
    from hwcompress.compress.profile import get_profile
    from hwcompress.config.targets import get_target
    from hwcompress.model.examples import resnet18
    from hwcompress.passes import run_canonical
    from hwcompress.passes.quantize import pow2_layer_names
    from hwcompress.measure.cycle_model import modelled_latency
    from hwcompress.search.latency_table import LatencyTable
    from hwcompress.search.candidates import candidates
    from hwcompress.search.loop import search

    model = run_canonical(resnet18(input_size=32, classes=10, width=0.5))[0]
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]
    target, profile = get_target("npu16"), get_profile("npu16")
    profile = replace(profile, prune=replace(profile.prune, enabled=False))
    result = search(model, target, profile, CompileOptions(target="npu16", tune_trials=0, cache_dir=tmp_path),
                    Calibration(feeds, "random"), feeds, None, max_accuracy_drop=100.0, max_rounds=1)
    trials = {t.candidate: t for t in result.trials}
    # int8 alone: the NPU runs int8 anyway, so its model prices it like fp32 and it is not built.
    assert trials["int8 (per layer)"].latency_method == "table"
    assert "no faster than fp32" in trials["int8 (per layer)"].reason
    mixed = trials["int8 + pow2 (per layer)"]
    assert mixed.latency_method == "model" and mixed.latency_ms < result.baseline_latency_ms
    assert mixed.accepted and trials["pow2"].latency_ms <= mixed.latency_ms  # pow2 everywhere: fewer bytes still
    assert result.applied[0] in ("pow2", "int8 + pow2 (per layer)")  # the one with more gain per point lost
    table = LatencyTable(target, tmp_path)
    (candidate,) = [c for c in candidates(profile, target, Calibration(feeds, "random"), table)
                    if c.name == "int8 + pow2 (per layer)"]
    quantized = candidate.apply(model)
    pow2 = pow2_layer_names(quantized)
    layers = [n.name for n in quantized.graph.node if n.op_type in ("Conv", "Gemm")]
    assert pow2 and set(layers) - pow2 and layers[0] not in pow2  # weight-bound layers pow2, the stem int8
    assert modelled_latency(quantized, target)[0].median_ms == pytest.approx(mixed.latency_ms)


def _detector_like(rng):
    """A tiny detector: a conv trunk, then a box head and a sigmoid score head (no (1, N) logits)."""
    from onnx import helper

    from conftest import make_model

    inits = {"w1": rng.normal(0, 0.3, (16, 3, 3, 3)), "w2": rng.normal(0, 0.2, (16, 16, 3, 3)),
             "wb": rng.normal(0, 0.2, (4, 16, 1, 1)), "ws": rng.normal(0, 0.2, (3, 16, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "wb"], ["boxes"]),
             helper.make_node("Conv", ["r2", "ws"], ["s"]), helper.make_node("Sigmoid", ["s"], ["scores"])]
    return make_model(nodes, [("x", [1, 3, 32, 32])], [("boxes", [1, 4, 16, 16]), ("scores", [1, 3, 16, 16])], inits)


def test_a_detector_is_scored_by_the_users_metric_with_each_outputs_fidelity(tmp_path, rng):
    """A user metric (a .py file, called with every validation input's outputs and the labels) is
    what the search keeps within budget; each built trial also carries every output's SQNR and
    cosine against the uncompressed model, and the report states them. (Without --metric such a
    model is scored by output fidelity: test_metrics.)"""
    import onnx

    onnx.save(_detector_like(rng), str(tmp_path / "det.onnx"))
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (16, 3, 32, 32)).astype(np.float32))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "int8.yaml").write_text(textwrap.dedent("""
        name: int8
        target: host
        accuracy_budget: {max_top1_drop: 50.0}
        search: {max_rounds: 1}
        passes:
          prune: {enabled: false}
          lowrank: {enabled: false}
          quantize: {enabled: true, schemes: [int8]}
    """))
    (tmp_path / "box_metric.py").write_text(
        "import numpy as np\n"
        "def mean_score(outputs, labels):\n"
        "    assert labels is None and len(outputs) == 16 and len(outputs[0]) == 2\n"
        "    return float(np.mean([o[1].mean() for o in outputs]) * 100)\n")
    common = ["--target", "host", "--tune-trials", "0", "--repeat", "3", "--profile", "int8",
              "--profiles-dir", str(tmp_path / "profiles"), "--calib", str(tmp_path / "calib.npz"), "--json"]
    result = hwc("compile", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "c"), *common, "--metric", "top1")
    assert result.returncode == 2 and "--metric top1 needs --labels" in result.stderr
    assert not (tmp_path / "c").exists()
    result = hwc("compile", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "a"), *common,
                 "--metric", f"{tmp_path / 'box_metric.py'}:mean_score")
    assert result.returncode == 0, result.stderr
    search = json.loads(result.stdout)["search"]
    assert search["accuracy_metric"].startswith("mean_score (user metric")
    assert 0 < search["baseline_accuracy"] < 100  # the mean sigmoid score, in the user's units
    baseline = search["trials"][0]["fidelity"]  # the compiled uncompressed model: float rounding only
    assert all(db is None or db > 100 for db in baseline["sqnr_db"]) and baseline["cosine"] == [1.0, 1.0]
    int8 = next(t for t in search["trials"] if t["candidate"] == "int8")
    assert len(int8["fidelity"]["sqnr_db"]) == 2 and all(10 < db < 80 for db in int8["fidelity"]["sqnr_db"])
    assert all(0.9 < c < 1 for c in int8["fidelity"]["cosine"])
    assert "Outputs of the chosen model vs the uncompressed one" in (tmp_path / "a" / "report.md").read_text()


def test_the_search_ends_with_its_fastest_int8_model_when_later_structure_spent_the_budget():
    """Structure goes before precision, so a pruning step can take the accuracy int8 needed. Seen
    on MobileNetV2: rounds 1-2 each applied a small pruning step while int8 (accepted beside them,
    1.7 ms) waited; in round 3 int8 on the twice-pruned model broke the budget, and the search
    ended at 3.0 ms. It now ends with the fastest accepted int8 model, and its path."""
    from hwcompress.progress import Progress
    from hwcompress.search.loop import SearchResult, Trial, _finish_with_the_best, _Finished

    def trial(round_, name, ms, accuracy, chosen=False):
        return Trial(round_, name, ms, "local", accuracy, accepted=True, chosen=chosen)

    pruned_once, pruned_twice = object(), object()
    trials = [trial(0, "baseline", 3.3, 83.3, chosen=True), trial(1, "prune a", 3.2, 83.9, chosen=True),
              trial(1, "int8", 1.8, 83.9), trial(2, "prune b", 3.1, 83.3, chosen=True), trial(2, "int8", 1.7, 84.4)]
    result = SearchResult(pruned_twice, ["prune a", "prune b"], 3.3, 83.3, 3.1, 83.3, "top1", "compiled artifact",
                          trials)
    lines = []
    _finish_with_the_best(result, _Finished(trials[4], pruned_once, ["prune a", "int8"]), Progress(lines.append))
    assert result.model is pruned_once and result.applied == ["prune a", "int8"]
    assert (result.latency_ms, result.accuracy) == (1.7, 84.4)
    assert [t.candidate for t in result.trials if t.chosen] == ["baseline", "prune a", "int8"]
    assert result.trials[4].chosen and lines
    assert "superseded: the search ended with round 2's int8" in result.trials[3].reason  # the report says why
    # Where the rounds ended faster than any int8 model, nothing changes.
    _finish_with_the_best(result, _Finished(trials[2], object(), ["int8"]), Progress(lines.append))
    assert result.model is pruned_once and result.latency_ms == 1.7
