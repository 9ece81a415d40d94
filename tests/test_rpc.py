"""Measuring through a real TVM RPC tracker and real RPC servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import hwc, shared_model
from hwcompress.model import reference as ort
from hwcompress.compile import CompileOptions, compile_model
from hwcompress.errors import HwcError
from hwcompress.model.loading import load_model
from hwcompress.config.device import parse_device
from hwcompress.measure.latency import Job, MeasurementCache
from hwcompress.measure.rpc import measure_all, wait_for_key
from hwcompress.progress import Progress


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, scratch: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": scratch})


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Until something accepts connections on the port (the tracker has started listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class Farm:
    """A tracker and servers with one key, all on loopback, stopped at the end."""

    def __init__(self, servers: int, key: str = "hwc-test"):
        self.port = _free_port()
        self.key = key
        # A server killed mid-session leaves the session's upload folder behind (TVM removes it only
        # when the session ends): the farm's processes write under a folder of their own, removed at close.
        self.scratch = tempfile.mkdtemp(prefix="hwc-farm-")
        self.tracker = _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                              "--port-end", str(self.port + 1), scratch=self.scratch)
        _wait_for_port(self.port)
        self.servers = [self.add_server() for _ in range(servers)]
        try:
            wait_for_key(self.device, servers, timeout=60)
        except HwcError:
            # Seen once in CI (2 cores under load): the servers never registered. Start a fresh set
            # once before failing, so that a slow start does not fail a test about something else.
            for proc in self.servers:
                _stop(proc)
            self.servers = [self.add_server() for _ in range(servers)]
            wait_for_key(self.device, servers, timeout=60)

    @property
    def url(self) -> str:
        return f"rpc://127.0.0.1:{self.port}/{self.key}"

    @property
    def device(self):
        return parse_device(self.url)

    def add_server(self) -> subprocess.Popen:
        port = _free_port()
        return _start("hwcompress.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end",
                      str(port + 1), "--tracker", f"127.0.0.1:{self.port}", "--key", self.key, scratch=self.scratch)

    def close(self) -> None:
        for proc in self.servers + [self.tracker]:
            _stop(proc)
        shutil.rmtree(self.scratch, ignore_errors=True)


@pytest.fixture
def own_farm():
    """A farm of its own, for a test that stops its servers."""
    farm = Farm(servers=2)
    yield farm
    farm.close()


@pytest.fixture(scope="module")
def module_farm():
    farm = Farm(servers=2)
    yield farm
    farm.close()


@pytest.fixture
def farm(module_farm):
    """The module's farm, both servers free again, for a test that leaves them running (a farm
    takes seconds to start)."""
    wait_for_key(module_farm.device, 2, timeout=60)
    return module_farm


def test_device_check_reports_key_version_and_kernel(farm):
    result = hwc("device", "check", farm.url, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["key"] == "hwc-test" and info["free_servers"] == 2
    assert info["remote"]["tvm"] == info["local_tvm"] and info["warning"] is None
    assert info["kernel_correct"] and info["kernel_ms"] > 0


def test_compile_measured_remotely_matches_onnx_runtime(farm, tmp_path):
    report = compile_model(shared_model("mnist-8"), tmp_path / "out",
                           CompileOptions(tune_trials=0, cache_dir=tmp_path / "cache", repeat=5, device=farm.url))
    assert report["latency"]["method"] == "rpc" and report["latency"]["device"] == farm.url
    assert report["latency"]["median_ms"] > 0
    assert report["accuracy"]["checked_on"] == farm.url and report["accuracy"]["max_relative_error"] < 1e-3
    assert "| rpc |" in (tmp_path / "out" / "report.md").read_text()


def _jobs(tmp_path: Path, count: int) -> list[Job]:
    compile_model(shared_model("mnist-8"), tmp_path / "lib", CompileOptions(tune_trials=0, cache_dir=tmp_path / "c",
                                                                           repeat=3))
    model = load_model(shared_model("mnist-8"))
    feeds = ort.random_inputs(model)
    return [Job(f"mnist-{i}", tmp_path / "lib" / "model.so", feeds, ["Input3"]) for i in range(count)]


def test_parallel_measurements_survive_a_server_killed_mid_run(own_farm, tmp_path):
    farm = own_farm
    jobs = _jobs(tmp_path, 8)
    cache = MeasurementCache(tmp_path / "measurements.json")
    events: list[str] = []

    def progress(event) -> None:
        events.append(event.text)
        if event.message == "measured" and event.done == 1 and farm.servers[0].poll() is None:
            _stop(farm.servers[0])

    results = measure_all(jobs, farm.device, cache, repeat=10, min_repeat_ms=100, progress=Progress(progress))
    assert set(results) == {j.key for j in jobs}
    assert all(r.method == "rpc" and r.median_ms > 0 for r in results.values())
    assert any("2 server(s)" in e for e in events)
    stored = json.loads((tmp_path / "measurements.json").read_text())
    assert set(stored) == set(results)
    # A second run reuses every figure without asking the device.
    farm.close()
    again = measure_all(jobs, farm.device, MeasurementCache(tmp_path / "measurements.json"), progress=Progress(lambda e: events.append(e.text)))
    assert {k: v.median_ms for k, v in again.items()} == {k: v.median_ms for k, v in results.items()}
    assert events[-1] == "all 8 measurements found in the cache"


def test_losing_every_server_keeps_finished_figures(tmp_path):
    farm = Farm(servers=1)
    try:
        jobs = _jobs(tmp_path, 4)
        cache = MeasurementCache(tmp_path / "m.json")

        def progress(event) -> None:
            if event.message == "measured" and event.done == 2:
                _stop(farm.servers[0])

        with pytest.raises(HwcError, match=r"could not be made .* finished ones are kept .* run again to resume"):
            measure_all(jobs, farm.device, cache, repeat=10, min_repeat_ms=100, progress=Progress(progress))
        kept = json.loads((tmp_path / "m.json").read_text())
        assert len(kept) >= 2
        farm.servers.append(farm.add_server())
        wait_for_key(farm.device, 1, timeout=60)
        resumed = measure_all(jobs, farm.device, MeasurementCache(tmp_path / "m.json"), repeat=10)
        assert set(resumed) == {j.key for j in jobs}
        assert all(resumed[k].median_ms == kept[k]["median_ms"] for k in kept), "finished figures are not redone"
    finally:
        farm.close()


def test_unreachable_tracker_and_unknown_key_are_one_line(tmp_path):
    port = _free_port()
    result = hwc("device", "check", f"rpc://127.0.0.1:{port}/board")
    assert result.returncode == 2 and "cannot reach the RPC tracker" in result.stderr
    assert "Traceback" not in result.stderr
    result = hwc("compile", str(shared_model("mnist-8")), "-o", str(tmp_path / "o"), "--tune-trials", "0",
                 "--device", f"rpc://127.0.0.1:{port}/board")
    assert result.returncode == 2 and "cannot reach the RPC tracker" in result.stderr and not (tmp_path / "o").exists()
    farm = Farm(servers=1)
    try:
        result = hwc("device", "check", f"rpc://127.0.0.1:{farm.port}/other")
        assert result.returncode == 2 and "no device with key 'other'" in result.stderr and "hwc-test" in result.stderr
    finally:
        farm.close()


def test_tuning_runs_candidates_on_the_device(farm, tmp_path, rng):
    """MetaSchedule's candidates are uploaded as linked libraries and timed on the RPC servers."""
    from onnx import helper

    from conftest import make_model

    inits = {"w": rng.normal(0, 0.2, (8, 4, 3, 3)), "b": np.zeros(8)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    path = tmp_path / "small.onnx"
    import onnx

    onnx.save_model(make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])], inits), str(path))
    report = compile_model(path, tmp_path / "out", CompileOptions(tune_trials=4, cache_dir=tmp_path / "cache",
                                                                 repeat=3, device=farm.url))
    assert report["tuning"]["trials_run"] > 0
    assert report["latency"]["method"] == "rpc" and report["accuracy"]["max_relative_error"] < 1e-3


def test_latency_table_is_measured_on_the_device_in_parallel(farm, tmp_path):
    from hwcompress.config.targets import get_target
    from hwcompress.search.latency_table import LatencyTable
    from hwcompress.search.layer_spec import model_layers
    from hwcompress.passes import run_canonical

    model = run_canonical(load_model(shared_model("mnist-8")))[0]
    events: list[str] = []
    table = LatencyTable(get_target("host"), tmp_path / "cache", trials=0, device=farm.url,
                         progress=Progress(lambda e: events.append(e.text)))
    total, per_layer = table.predict_ms(model)
    assert table.method == "rpc" and set(per_layer) == set(model_layers(model)) and total > 0
    assert any("on 2 server(s)" in e for e in events), events  # every free server of the key took work
    saved = json.loads(table.cache.path.read_text())
    assert {v["device"] for v in saved.values()} == {farm.url}
    assert LatencyTable(get_target("host"), tmp_path / "cache", device=farm.url).predict_ms(model)[1] == per_layer
