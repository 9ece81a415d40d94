"""The package's structure: the flow load -> passes -> compress -> backend -> measure -> search ->
report is visible in its folders, and imports only run down that flow."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "hwcompress"

# Each stage may import from its own floor and the floors below, never from above.
FLOORS = [
    {"errors", "progress"},
    {"config", "model", "data"},
    {"passes"},
    {"compress", "backend"},
    {"measure"},
    {"search", "report"},
    {"compile", "compare"},
    {"cli", "rpc_server"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(name, path, set(modules)):
            graph.add_edge(name, target)
    return graph


def _stage(module: str) -> str:
    return module.split(".")[1]


def _floor(stage: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if stage in floor)


def test_no_import_circle_between_modules():
    ours = _graph().subgraph([n for n in _graph() if n.startswith("hwcompress")])
    cycles = list(nx.simple_cycles(ours))
    assert not cycles, f"import circles: {cycles}"


def test_imports_only_run_down_the_flow():
    graph = _graph()
    stages = {_stage(n) for n in graph if n.startswith("hwcompress.")}
    assert stages <= set().union(*FLOORS), f"stages without a floor: {stages - set().union(*FLOORS)}"
    upward = [(a, b) for a, b in graph.edges if a.startswith("hwcompress.") and b.startswith("hwcompress.")
              and _floor(_stage(b)) > _floor(_stage(a))]
    assert not upward, f"imports that run back up: {upward}"
    # The package's own __init__ only starts TVM's thread pool configuration.
    assert {b for b in graph.successors("hwcompress") if b.startswith("hwcompress")} == {"hwcompress.config.host"}


def test_search_builds_and_measures_through_interfaces_only():
    graph = _graph()
    for module in (n for n in graph if n.startswith("hwcompress.search")):
        tvm = [b for b in graph.successors(module) if b == "tvm" or b.startswith("tvm.")]
        assert not tvm, f"{module} imports TVM ({tvm}); it must build through backend and time through measure"


def test_passes_are_pure_rewrites():
    """Nothing under passes/ runs a model: no ONNX Runtime, no TVM, no calibration data."""
    graph = _graph()
    for module in (n for n in graph if n.startswith("hwcompress.passes")):
        runs = [b for b in graph.successors(module)
                if b.split(".")[0] in ("onnxruntime", "tvm") or b in ("hwcompress.model.reference",)
                or b.startswith(("hwcompress.data", "hwcompress.backend", "hwcompress.measure"))]
        assert not runs, f"{module} imports {runs}"


def test_few_modules_at_the_top_level():
    top = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 12, sorted(p.name for p in top)
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"model", "data", "config", "passes", "compress", "backend", "measure", "search", "report"} <= stages


def test_one_measurement_factory():
    """Backends are chosen in one place: no module but the factory constructs one."""
    constructors = ("LocalMeasurer(", "RpcMeasurer(", "CycleModelMeasurer(", "NotMeasurable(")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "factory.py" and path.parent.name == "measure":
            continue
        text = path.read_text()
        assert not any(c in text.replace(f"class {c}", "") for c in constructors), f"{path} builds a measurer"


def test_no_raw_target_or_profile_dicts_outside_config():
    """Targets and profiles are typed objects; their YAML dicts are read only where they are parsed."""
    raw = ('.latency["', ".latency.get(", '.tvm["', ".tvm.get(", ".int8.get(", ".passes.get(", ".passes[")
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "config" or path.name == "profile.py":
            continue
        text = path.read_text()
        assert not any(r in text for r in raw), f"{path} reads a raw target/profile dict"
