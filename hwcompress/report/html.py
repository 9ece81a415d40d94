"""A self-contained HTML report (plots embedded as PNG) from a compile or search report dict."""

from __future__ import annotations

import base64
import functools
import html
import io
from typing import Any


@functools.lru_cache(maxsize=None)
def _pyplot():
    """matplotlib, imported when a plot is drawn: importing it takes 0.7 s, which every ``hwc``
    command paid before reading its arguments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def kernel_plot(before: dict[str, float], after: dict[str, float], title: str) -> str:
    names = sorted(set(before) | set(after), key=lambda n: -max(before.get(n, 0), after.get(n, 0)))[:25]
    figure, axis = _pyplot().subplots(figsize=(9, 0.3 * len(names) + 1.2))
    y = range(len(names))
    axis.barh([i + 0.2 for i in y], [before.get(n, 0) for n in names], height=0.4, label="before")
    axis.barh([i - 0.2 for i in y], [after.get(n, 0) for n in names], height=0.4, label="after")
    axis.set_yticks(list(y), names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("ms per run (measured, TVM)")
    axis.set_title(title)
    axis.legend()
    return _png(figure)


def bar_plot(values: dict[str, float], title: str, unit: str) -> str:
    names = sorted(values, key=lambda n: -values[n])[:25]
    figure, axis = _pyplot().subplots(figsize=(9, 0.3 * len(names) + 1.2))
    axis.barh(range(len(names)), [values[n] for n in names])
    axis.set_yticks(list(range(len(names))), names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel(unit)
    axis.set_title(title)
    return _png(figure)


def pareto_plot(trials: list[dict[str, Any]], pareto: list[dict[str, Any]], metric: str, method: str) -> str:
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    points = [t for t in trials if t["latency_ms"] is not None]
    for kind, marker in (("rejected", "x"), ("accepted", "o")):
        chosen = [t for t in points if t["accepted"] == (kind == "accepted")]
        axis.scatter([t["latency_ms"] for t in chosen], [t["accuracy"] for t in chosen], marker=marker, label=kind)
    predicted = [t for t in trials if t["latency_ms"] is None and t.get("predicted_ms") is not None
                 and t["accuracy"] == t["accuracy"]]  # scored, not compiled (NaN accuracy: not scored)
    if predicted:
        axis.scatter([t["predicted_ms"] for t in predicted], [t["accuracy"] for t in predicted], marker=".",
                     color="grey", label="latency-table prediction only")
    for t in points:
        axis.annotate(f"r{t['round']} {t['candidate']}", (t["latency_ms"], t["accuracy"]), fontsize=7)
    axis.plot([p["latency_ms"] for p in pareto], [p["accuracy"] for p in pareto], "k--", lw=0.8, label="Pareto front")
    axis.set_xlabel(f"latency ms ({method})")
    axis.set_ylabel(metric)
    axis.legend()
    return _png(figure)


def comparison_plot(rows: list[dict[str, Any]]) -> str:
    figure, axis = _pyplot().subplots(figsize=(7, 3.5))
    labels = [r["target"] for r in rows]
    values = [r["latency_ms"] or 0 for r in rows]
    bars = axis.bar(labels, values)
    for bar, row in zip(bars, rows):
        axis.annotate(row["latency_method"], (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("latency ms")
    return _png(figure)


def render(title: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f"<h2>{html.escape(name)}</h2>\n{content}" for name, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
