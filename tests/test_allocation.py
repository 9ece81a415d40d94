"""Pruning ratios allocated across groups by sensitivity curves: latency saved per output error."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hwcompress.search.allocation import Curve, Point, allocate, merged_order


def test_steps_are_taken_by_latency_saved_per_error_along_each_curves_hull():
    cheap = Curve(["a"], [Point(0.25, 0.01, 1.0), Point(0.5, 0.02, 1.5)])
    # 0.25 saves nothing the 0.5 point does not save better per error; 0.75 saves nothing more.
    bent = Curve(["b"], [Point(0.25, 0.04, 0.2), Point(0.5, 0.05, 2.0), Point(0.75, 0.5, 2.0)])
    useless = Curve(["c"], [Point(0.5, 0.0, -0.1)])  # the table says it would be slower
    order = merged_order([cheap, bent, useless])
    assert [(curve.group[0], point.ratio) for point, curve, _, _ in order] == [("a", 0.25), ("a", 0.5), ("b", 0.5)]
    slopes = [saving / error for _, _, error, saving in order]
    assert slopes == sorted(slopes, reverse=True)
    assert [error for _, _, error, _ in order] == pytest.approx([0.01, 0.01, 0.05])


def test_steps_after_the_longest_good_prefix_are_tried_one_at_a_time():
    """A step that breaks the floor is passed over and the ones after it still tried, except the
    later steps of its own group (each builds on the one that failed); at most WALK_PROBES builds."""
    from hwcompress.search.allocation import WALK_PROBES, _choice, _walk

    curves = {g: Curve([g]) for g in "abcd"}
    order = [(Point(ratio, 0.0, 0.0), curves[g], 0.0, 0.0)
             for g, ratio in [("a", 0.25), ("b", 0.25), ("c", 0.25), ("b", 0.5), ("d", 0.25), ("a", 0.5)]]
    tried = []

    def probe(steps):
        tried.append(steps)
        return 1 not in steps  # b at 0.25 breaks the floor

    _walk(order, 1, probe, lambda: True)
    assert tried == [[0, 1], [0, 2], [0, 2, 4], [0, 2, 4, 5]]
    assert _choice([order[i] for i in tried[-1]]) == {"a": 0.5, "c": 0.25, "d": 0.25}
    tried.clear()  # the bisection had built [0, 1] and seen it fail: not built again
    _walk(order, 1, probe, lambda: True, known_bad=True)
    assert tried == [[0, 2], [0, 2, 4], [0, 2, 4, 5]]
    long = order * (WALK_PROBES // len(order) + 2)
    tried.clear()
    _walk(long, 0, lambda steps: tried.append(steps) or True, lambda: True)
    assert len(tried) == WALK_PROBES


def test_an_allocation_keeps_the_floor_and_its_error_is_the_sum_of_the_groups(tmp_path, monkeypatch):
    """ResNet-18 (generated, width 0.5) on npu16 (its cycle model prices the shapes: no build),
    scored by output cosine similarity with ONNX Runtime: the allocation found stays at or above
    the floor, the bisection's probes past it fell below, every group chosen saves latency, and the
    squared output errors of the groups alone add up to the combination's."""
    from hwcompress.compress.fidelity import output_error
    from hwcompress.compress.profile import get_profile
    from hwcompress.config.targets import get_target
    from hwcompress.data.calibration import Calibration
    from hwcompress.model import reference as ort
    from hwcompress.model.examples import resnet18
    from hwcompress.passes import run_canonical
    from hwcompress.progress import SILENT
    from hwcompress.search.latency_table import LatencyTable
    from hwcompress.search.layer_spec import model_layers

    model = run_canonical(resnet18(input_size=32, classes=10, width=0.5))[0]
    rng = np.random.default_rng(0)
    calibration = Calibration([{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
                               for _ in range(24)], "random")
    scored = calibration.feeds[18:]  # the held-out quarter the curves are measured on
    reference = [ort.run(model, f)[0].ravel() for f in scored]

    def cosine_percent(candidate):
        got = [ort.run(candidate, f)[0].ravel() for f in scored]
        return 100 * float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(reference, got)]))

    target = get_target("npu16")
    # Channels ranked by L1 norm: the ranking is tested elsewhere, and costs most of the time here.
    recipe = replace(get_profile("npu16").prune, per_layer=True, ratios=(0.5,), allocate=True, importance="l1")
    table = LatencyTable(target, tmp_path)
    floor = 99.0
    monkeypatch.setattr("hwcompress.search.allocation.WALK_PROBES", 2)  # the walk is tested on its own
    found = allocate(model, recipe, target, calibration, table, cosine_percent, floor, SILENT, lambda: True)
    assert found is not None and found.accuracy >= floor
    assert found.accuracy == pytest.approx(cosine_percent(found.model))
    chosen_steps = max(p["steps"] for p in found.probes if p["accuracy"] >= floor)
    assert all(p["accuracy"] < floor for p in found.probes if p["steps"] > chosen_steps)
    curves = {c.group[0]: c for c in found.curves}
    assert len(curves) > 4 and found.ratios
    for group, ratio in found.ratios.items():
        (point,) = [p for p in curves[group].points if p.ratio == ratio]
        assert point.saving_ms > 0
    for layer, (before, after) in found.shapes.items():
        assert after < before and model_layers(found.model)[layer].weight_shape[0] == after
    assert table.predict_ms(found.model)[0] < table.predict_ms(model)[0]
    # Errors add in squares: the combination's own error is what its groups' sum predicted.
    measured = output_error(model, found.model, scored)
    assert measured == pytest.approx(found.predicted_error, rel=0.5)


def test_the_search_allocates_in_its_first_round_and_reports_the_curves(tmp_path):
    """`hwc compile` with a profile that allocates (npu16: its cycle model prices the layers, so no
    layer is built): round 1 holds the allocated candidate instead of one-group steps, priced by
    the table and scored, and the report lists each group's curve, the ratios chosen and the probes."""
    import json
    import textwrap

    from conftest import assert_matches_report_schema, hwc

    assert hwc("example", "resnet18", "--input-size", "32", "--width", "0.5", "--classes", "10",
               "-o", str(tmp_path / "model.onnx")).returncode == 0
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "alloc.yaml").write_text(textwrap.dedent("""
        name: alloc
        target: npu16
        accuracy_budget: {max_top1_drop: 100}
        search: {max_rounds: 1, layer_candidates: 2}
        passes:
          prune: {enabled: true, per_layer: true, ratios: [0.5], branches: true, importance: l1, allocate: true}
    """))
    result = hwc("compile", str(tmp_path / "model.onnx"), "--target", "npu16", "--profile", "alloc",
                 "--profiles-dir", str(tmp_path / "profiles"), "--calib", "random", "--tune-trials", "0",
                 "--cache-dir", str(tmp_path / "cache"), "--json", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_matches_report_schema(report)
    search = report["search"]
    allocation = search["allocation"]
    assert allocation["share"] == 1.0 and allocation["chosen"] and len(allocation["curves"]) > 4
    assert all(set(c) == {"group", "points"} for c in allocation["curves"])
    (trial,) = [t for t in search["trials"] if t["candidate"].startswith("prune (allocated")]
    assert trial["round"] == 1 and trial["predicted_ms"] < search["trials"][0]["latency_ms"]
    assert trial["layers"] and all(after < before for before, after in trial["layers"].values())
    assert not [t for t in search["trials"] if t["round"] == 1 and t["candidate"].startswith("prune ")
                and t is not trial]  # no one-group step in the allocating round
    assert trial["chosen"] and search["applied"] == [trial["candidate"]]
    # With `branches`, the curve of the group a residual branch's first layer forms ends at ratio 1,
    # the branch removed (ResNet-18: 5 of its 8 blocks branch off their input); the budget allows all.
    ends = [c["points"][-1]["ratio"] for c in allocation["curves"] if c["points"]]
    assert ends.count(1) == 5 and list(allocation["chosen"].values()).count(1) == 5
    assert sum(after == 0 for _, after in trial["layers"].values()) == 10
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Sensitivity allocation" in markdown and "Probes (bisection" in markdown
    assert "1 (branch removed)" in markdown
    assert "allocation: sensitivity of" in result.stderr
