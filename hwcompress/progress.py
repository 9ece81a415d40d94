"""Progress of long work as structured events, rendered by whoever listens (the CLI: lines on stderr,
a bar on a terminal). Work reports to a ``Progress``; it never formats counters into text to be parsed back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Event:
    """One step: ``message``, and for counted work ``done`` of ``total`` (tuning trials, layers, candidates)."""

    message: str
    stage: str = ""            # which part of the flow: load, tune, build, measure, latency table, search, ...
    done: int | None = None
    total: int | None = None
    scope: str = ""            # whose work, where several run side by side (a target in ``hwc compare``)
    warning: bool = False      # something the user should see even with --quiet

    @property
    def counted(self) -> bool:
        return self.done is not None and self.total is not None

    @property
    def text(self) -> str:
        """The event as one line of text."""
        scope = f"[{self.scope}] " if self.scope else ""
        count = f"[{self.done}/{self.total}] " if self.counted else ""
        return f"{scope}{count}{self.message}"


class Progress:
    """Where work reports to. Call it with a message (and counts); ``at`` and ``within`` make a
    Progress for a stage or a scope that forwards to the same listener."""

    def __init__(self, listener: Callable[[Event], None] | None = None, stage: str = "", scope: str = ""):
        self.listener, self.stage, self.scope = listener, stage, scope

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        if self.listener is not None:
            self.listener(Event(message, self.stage, done, total, self.scope))

    def warn(self, message: str) -> None:
        if self.listener is not None:
            self.listener(Event(message, self.stage, scope=self.scope, warning=True))

    def at(self, stage: str) -> "Progress":
        return Progress(self.listener, stage, self.scope)

    def within(self, scope: str) -> "Progress":
        return Progress(self.listener, self.stage, scope)


SILENT = Progress()
