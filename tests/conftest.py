"""Shared fixtures: paths to ../shared material and small helpers to build and compare models."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwcompress.model import reference as ort

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HWC_SHARED_DIR", ROOT.parent / "shared"))


def pytest_xdist_auto_num_workers(config) -> int:
    """Two test processes (``-n auto``): one compiles while the other waits on ONNX Runtime or a
    subprocess; more would only share the same cores, since each TVM run uses all of them."""
    return min(2, os.cpu_count() or 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test marked ``timed`` compares two measurements (a latency table against a kernel timed
    alone, a kernel's share of the model's time): it runs with the machine to itself, its setup and
    teardown included, while the other worker waits; other tests share the machine. (Two TVM thread
    pools on two cores read a 0.18 ms kernel as 4 ms.) A test that checks decisions against the
    figures they were made from, as the search tests do, holds however noisy the figures are."""
    with _machine_share(item.config, exclusive=item.get_closest_marker("timed") is not None):
        yield


@contextlib.contextmanager
def _machine_share(config, exclusive: bool):
    """A readers-writer lock between pytest-xdist's workers: flock on two files in the run's temp
    folder (each worker's is a folder in it; pytest removes old runs'). The turnstile makes a waiting
    ``timed`` test go next instead of waiting out every shared one."""
    if not hasattr(config, "workerinput"):  # one process: nothing to share
        yield
        return
    folder = Path(config.option.basetemp).parent
    with open(folder / "machine.turnstile", "a") as turnstile, open(folder / "machine.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory) -> Path:
    """A cache folder for the test session (``HWC_CACHE_DIR``, seen by the ``hwc`` processes the
    tests start too): tests neither read nor add to the user's tuning records, latency tables and
    measurements (a user's tuned records would change what an untuned build is, and MetaSchedule's
    database is parsed by every build: 1.1 s at 581 records). The aarch64 runtime downloaded once
    stays shared: its folder is the user's."""
    from hwcompress.config.cache import default_cache_dir

    folder = tmp_path_factory.mktemp("hwc-cache")
    emulation = default_cache_dir() / "emulation"
    emulation.mkdir(parents=True, exist_ok=True)
    (folder / "emulation").symlink_to(emulation, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HWC_CACHE_DIR", str(folder))
        yield folder


def shared_model(name: str) -> Path:
    path = SHARED / "models" / name / "model.onnx"
    if not path.exists():
        pytest.fail(f"shared model {path} is missing; set HWC_SHARED_DIR to the shared/ folder")
    return path


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto, tol: float = 1e-4,
                        seed: int = 0) -> float:
    """Both models on the same random feeds through ONNX Runtime; max error relative to output scale."""
    feeds = ort.random_inputs(reference, seed)
    error = ort.relative_error(ort.run(reference, feeds), ort.run(candidate, feeds))
    assert error < tol, f"outputs differ by {error:.3e} relative to the output scale (tolerance {tol})"
    return error


def assert_built_like_onnxruntime(kernels, target, model: onnx.ModelProto, tol: float = 1e-5) -> float:
    """``kernels`` (``build.lower`` of ``model``) built for ``target`` and run by TVM's VM on random
    feeds, against ONNX Runtime's outputs of ``model``; max error relative to the output scale."""
    import tvm
    from tvm import relax

    from hwcompress.backend import build as tvm_build
    from hwcompress.backend.runtime import outputs_to_numpy

    feeds = ort.random_inputs(model, seed=1)
    vm = relax.VirtualMachine(tvm_build.build(kernels, target, None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))
    error = ort.relative_error(ort.run(model, feeds), got)
    assert error < tol, f"TVM's outputs differ from ONNX Runtime's by {error:.3e} (tolerance {tol})"
    return error


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def make_model(nodes, inputs, outputs, initializers: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A checked model from helper nodes; inputs/outputs are (name, shape) pairs of float32."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(_as_weight(a), k) for k, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def _as_weight(array) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)


def bn_params(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    return {f"{prefix}_g": rng.uniform(0.5, 1.5, channels), f"{prefix}_b": rng.normal(0, 0.5, channels),
            f"{prefix}_m": rng.normal(0, 0.5, channels), f"{prefix}_v": rng.uniform(0.5, 1.5, channels)}


def bn_node(x: str, y: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in "gbmv"], [y], epsilon=1e-3)


def hwc(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``hwc`` command as a user would."""
    return subprocess.run([sys.executable, "-m", "hwcompress.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def assert_matches_report_schema(report: dict) -> None:
    """``report.json`` as documented in docs/report.schema.json."""
    import json

    import jsonschema

    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
