"""What accuracy means for each kind of model: top-1, agreement, output fidelity, the user's own."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hwcompress.errors import HwcError
from hwcompress.search.metrics import check_metric, cosine_similarity, metric_for, sqnr_db


def _outputs(*arrays_per_input):
    return [list(arrays) for arrays in arrays_per_input]


def test_the_default_metric_follows_the_labels_and_the_outputs_form(rng):
    logits = _outputs(*[(rng.normal(size=(1, 10)),) for _ in range(6)])
    labels = np.array([o[0].argmax() for o in logits])
    labels[0] = (labels[0] + 1) % 10
    assert metric_for(None, labels, logits).name == "top-1 (%)"
    assert metric_for(None, labels, logits).score(logits) == pytest.approx(100 * 5 / 6)
    agreement = metric_for(None, None, logits)
    assert agreement.name.startswith("top-1 agreement") and agreement.score(logits) == 100.0
    # A detector (boxes and scores) or an embedding map: argmax means nothing, fidelity does.
    detections = _outputs(*[(rng.normal(size=(1, 100, 4)), rng.normal(size=(1, 100))) for _ in range(4)])
    fidelity = metric_for(None, None, detections)
    assert fidelity.name.startswith("output cosine similarity") and fidelity.score(detections) == pytest.approx(100)
    noisy = [[a + rng.normal(0, 0.3, a.shape) for a in o] for o in detections]
    assert 80 < fidelity.score(noisy) < 99.9
    assert metric_for("fidelity", None, logits).name.startswith("output cosine")  # chosen explicitly


def test_sqnr_and_cosine_per_output():
    reference = _outputs((np.ones((2, 2)), np.array([3.0, 4.0])))
    assert sqnr_db(reference, reference) == [math.inf, math.inf]
    noisy = _outputs((np.ones((2, 2)) * 1.1, np.array([3.0, 4.0])))
    # |y|^2 = 4, |y - y'|^2 = 4 * 0.01: 20 dB.
    assert sqnr_db(reference, noisy)[0] == pytest.approx(20.0)
    assert cosine_similarity(reference, _outputs((-np.ones((2, 2)), np.array([4.0, -3.0])))) == [-1.0, 0.0]


def test_a_user_metric_gets_the_outputs_and_labels(tmp_path):
    (tmp_path / "my_metric.py").write_text(
        "import numpy as np\n"
        "def neg_box_error(outputs, labels):\n"
        "    return -float(np.mean([abs(o[0] - l).mean() for o, l in zip(outputs, labels)]))\n"
        "def broken(outputs, labels):\n"
        "    raise ValueError('no boxes')\n"
        "def not_a_number(outputs, labels):\n"
        "    return 'good'\n")
    outputs = _outputs((np.array([1.0, 2.0]),), (np.array([0.0, 0.0]),))
    labels = np.array([[1.0, 1.0], [0.5, 0.5]])
    metric = metric_for(f"{tmp_path / 'my_metric.py'}:neg_box_error", labels, outputs)
    assert metric.score(outputs) == pytest.approx(-0.5) and "neg_box_error" in metric.name
    with pytest.raises(HwcError, match="failed: ValueError: no boxes"):
        metric_for(f"{tmp_path / 'my_metric.py'}:broken", labels, outputs).score(outputs)
    with pytest.raises(HwcError, match="must return a finite number"):
        metric_for(f"{tmp_path / 'my_metric.py'}:not_a_number", labels, outputs).score(outputs)


@pytest.mark.parametrize("spec, message", [
    ("top1", "--metric top1 needs --labels"),
    ("nosuchmodule_hwc:f", "cannot import nosuchmodule_hwc: ModuleNotFoundError"),
    ("json:no_function", "json has no function 'no_function'"),
    ("accuracy", "expected top1, agreement, fidelity or MODULE:FUNCTION"),
    ("/nonexistent/m.py:f", "cannot import /nonexistent/m.py: FileNotFoundError"),
])
def test_a_metric_that_cannot_work_is_refused_before_any_build(spec, message):
    with pytest.raises(HwcError, match=message.replace("(", r"\(")):
        check_metric(spec, None)
