"""What "accuracy" means for a model: the number the search keeps within its budget.

- ``top1``: top-1 (%) against labels, for classifiers with labelled validation data;
- ``agreement``: top-1 (%) agreement with the uncompressed model, for classifiers without labels;
- ``fidelity``: output cosine similarity with the uncompressed model (%, mean over outputs and
  inputs), for everything else (detectors, OCR, embeddings, super-resolution), where an argmax
  means nothing; the report also gives each output's SQNR;
- ``module:function`` (or ``path/to/file.py:function``): the user's own, called as
  ``function(outputs, labels)`` with ``outputs`` one list of numpy arrays per validation input
  (the model's outputs in order) and ``labels`` the ``--labels`` array or None; it returns a number
  where higher is better, and the budget (``--max-accuracy-drop``) is in its units (Olive's custom
  metrics work the same way).

Without ``--metric``: top1 with labels, agreement for a model with one (1, N) output, else fidelity.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import HwcError

Outputs = list[list[np.ndarray]]  # per validation input, the model's outputs
BUILT_IN = ("top1", "agreement", "fidelity")


@dataclass
class Metric:
    name: str                                  # what the report calls the figure, with its unit
    score: Callable[[Outputs], float]          # higher is better


def metric_for(spec: str | None, labels: np.ndarray | None, reference: Outputs) -> Metric:
    """The metric ``spec`` names (None: chosen from the labels and the outputs' form); ``reference``
    holds the uncompressed model's outputs on the same inputs."""
    if spec is None:
        spec = "top1" if labels is not None else ("agreement" if _is_classifier(reference) else "fidelity")
    if spec == "top1":
        if labels is None:
            raise HwcError("--metric top1 needs --labels (the class of each --val sample)")
        return Metric("top-1 (%)", lambda outputs: _top1(outputs, labels))
    if spec == "agreement":
        truth = _argmax(reference)
        return Metric("top-1 agreement with the uncompressed model (%)", lambda outputs: _top1(outputs, truth))
    if spec == "fidelity":
        return Metric("output cosine similarity with the uncompressed model (%)",
                      lambda outputs: 100.0 * float(np.mean(cosine_similarity(reference, outputs))))
    return _user_metric(spec, labels)


def check_metric(spec: str | None, labels: np.ndarray | None) -> None:
    """Fail now, in one line, on a metric that cannot work (before any candidate is built)."""
    if spec is None or spec in ("agreement", "fidelity"):
        return
    if spec == "top1" and labels is None:
        raise HwcError("--metric top1 needs --labels (the class of each --val sample)")
    if spec != "top1":
        _user_metric(spec, labels)


def cosine_similarity(reference: Outputs, outputs: Outputs) -> list[float]:
    """Per output: cosine similarity of the flattened values over all inputs (1.0: same direction)."""
    values = []
    for i in range(len(reference[0])):
        a = np.concatenate([np.asarray(r[i], np.float64).ravel() for r in reference])
        b = np.concatenate([np.asarray(o[i], np.float64).ravel() for o in outputs])
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        values.append(1.0 if norm == 0 and not np.any(a - b) else float(a @ b / norm) if norm else 0.0)
    return values


def sqnr_db(reference: Outputs, outputs: Outputs) -> list[float]:
    """Per output: signal-to-quantization-noise ratio in dB, 10 log10(|y|^2 / |y - y'|^2) (inf: exact)."""
    values = []
    for i in range(len(reference[0])):
        a = np.concatenate([np.asarray(r[i], np.float64).ravel() for r in reference])
        b = np.concatenate([np.asarray(o[i], np.float64).ravel() for o in outputs])
        noise = float(np.sum((a - b) ** 2))
        values.append(math.inf if noise == 0 else 10 * math.log10(max(float(np.sum(a ** 2)), 1e-300) / noise))
    return values


def _is_classifier(reference: Outputs) -> bool:
    return len(reference[0]) == 1 and reference[0][0].ndim == 2 and reference[0][0].shape[0] == 1 \
        and reference[0][0].shape[1] >= 2


def _argmax(outputs: Outputs) -> np.ndarray:
    return np.array([o[0].reshape(-1).argmax() for o in outputs])


def _top1(outputs: Outputs, truth: np.ndarray) -> float:
    return float((_argmax(outputs) == truth).mean() * 100.0)


def _user_metric(spec: str, labels: np.ndarray | None) -> Metric:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise HwcError(f"--metric {spec!r}: expected {', '.join(BUILT_IN)} or MODULE:FUNCTION "
                       f"(a module name or a .py file, and the function in it)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(f"hwc_user_metric_{path.stem}", path)
            if loader is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error it raises while importing
        raise HwcError(f"--metric {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise HwcError(f"--metric {spec!r}: {module_name} has no function {function_name!r}")

    def score(outputs: Outputs) -> float:
        try:
            value = function(outputs, labels)
        except Exception as exc:
            raise HwcError(f"--metric {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise HwcError(f"--metric {spec!r} returned {value!r}; it must return a finite number (higher is better)")
        return float(value)

    return Metric(f"{function_name} (user metric {spec}, higher is better)", score)
