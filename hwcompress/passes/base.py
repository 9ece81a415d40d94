"""The one mechanism that turns a graph rewrite into a pure ONNX -> ONNX pass with a report.

A pass is written as ``fn(graph, log, **knobs)``: it edits a private ``Graph`` copy and records each
rewrite (``log.applied``) and each place it chose not to touch and why (``log.skipped``). The
``@model_pass`` decorator gives the user-facing form: ``pass_(model, **knobs) -> ModelProto`` and
``pass_.apply(model, **knobs) -> PassResult`` for callers that want the report too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from ..model.graph import Graph


@dataclass
class PassLog:
    """What a pass did, in words a user can check against the graph."""

    name: str
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "applied": self.applied, "skipped": self.skipped, **self.details}


@dataclass
class PassResult:
    model: onnx.ModelProto
    log: PassLog


class ModelPass:
    """A named, pure ONNX -> ONNX function built from a graph rewrite."""

    def __init__(self, fn: Callable[..., None]):
        functools.update_wrapper(self, fn)
        self.name = fn.__name__
        self._fn = fn

    def apply(self, model: onnx.ModelProto, **knobs: Any) -> PassResult:
        graph = Graph(model)
        log = PassLog(self.name)
        self._fn(graph, log, **knobs)
        return PassResult(graph.to_model(), log)

    def __call__(self, model: onnx.ModelProto, **knobs: Any) -> onnx.ModelProto:
        return self.apply(model, **knobs).model

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def model_pass(fn: Callable[..., None]) -> ModelPass:
    return ModelPass(fn)
