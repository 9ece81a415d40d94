"""Measuring on real devices through TVM's RPC tracker (TVM's engine for device farms).

A device is named ``rpc://TRACKER_HOST:PORT/KEY``: the tracker hands out one of the RPC servers
registered under KEY (boards started with ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key
KEY``). Libraries are uploaded, loaded and timed there with TVM's own ``time_evaluator``.
``measure_all`` spreads many measurements over every free server with that key, keeps each finished
figure in a cache file at once, and re-queues the work of a server that disappears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ..backend.export import export_library
from ..backend.runtime import outputs_to_numpy, to_device
from ..config.device import Device
from ..config.targets import Target
from ..errors import HwcError, first_line
from ..progress import SILENT, Progress
from .latency import Job, Latency, Measurement, MeasurementCache, Measurer, from_samples

def _with_timeout(fn: Callable, timeout: float, what: str):
    """Run ``fn`` in a thread; TVM's socket calls have no timeout of their own."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HwcError(f"{what}: no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _probe(device: Device, timeout: float) -> None:
    """A plain TCP connect first: TVM's client retries a refused connection for a minute."""
    try:
        socket.create_connection((device.host, device.port), timeout=timeout).close()
    except OSError as exc:
        raise HwcError(f"cannot reach the RPC tracker at {device.host}:{device.port}: "
                       f"{exc.strerror or type(exc).__name__}") from exc


def tracker_summary(device: Device, timeout: float = 10.0) -> dict:
    from tvm import rpc

    _probe(device, timeout)
    logging.getLogger("RPCServer").setLevel(logging.ERROR)

    def ask():
        return rpc.connect_tracker(device.host, device.port).summary()

    try:
        return _with_timeout(ask, timeout, f"RPC tracker {device.host}:{device.port}")
    except HwcError:
        raise
    except Exception as exc:  # TVM raises RuntimeError/ConnectionError/TVMError variants
        raise HwcError(f"cannot reach the RPC tracker at {device.host}:{device.port}: "
                       f"{first_line(exc)}") from exc


def free_servers(device: Device, summary: dict | None = None) -> int:
    summary = summary if summary is not None else tracker_summary(device)
    queue_info = summary.get("queue_info", {}).get(device.key)
    if not queue_info:
        keys = sorted(summary.get("queue_info", {}))
        raise HwcError(f"no device with key {device.key!r} at the tracker {device.host}:{device.port} "
                       f"(keys there: {', '.join(keys) or 'none'})")
    return int(queue_info.get("free", 0))


def open_session(device: Device, timeout: float = 60.0, session_timeout: float = 600.0):
    """A session on one server with the device's key; fails in one line if none answers in time."""
    from tvm import rpc

    summary = tracker_summary(device)
    free_servers(device, summary)
    registered = [s for s in summary.get("server_info", []) if s.get("key") == f"server:{device.key}"]
    if not registered:
        raise HwcError(f"no server with key {device.key!r} is registered at the tracker {device.host}:{device.port} "
                       f"any more (all gone or restarting)")

    def request():
        tracker = rpc.connect_tracker(device.host, device.port)
        return tracker.request(device.key, priority=1, session_timeout=session_timeout, max_retry=3)

    try:
        return _with_timeout(request, timeout, f"device {device.url}")
    except HwcError:
        raise
    except Exception as exc:
        raise HwcError(f"device {device.url} refused the session: "
                       f"{first_line(exc)}") from exc


def remote_device(session, target_kind: str):
    return session.cuda() if target_kind == "cuda" else session.cpu()


def run_remote(session, library: Path, feeds: dict[str, np.ndarray], input_names: list[str], target_kind: str,
               repeat: int, min_repeat_ms: int) -> tuple[list[float], list[np.ndarray]]:
    """Upload and load a library on the remote, run it once for outputs, then time it."""
    from tvm import relax

    # A fresh name per upload: overwriting a library the server has loaded can crash it.
    remote_name = f"hwc_{uuid.uuid4().hex[:12]}_{library.name}"
    session.upload(str(library), target=remote_name)
    module = session.load_module(remote_name)
    dev = remote_device(session, target_kind)
    vm = relax.VirtualMachine(module, dev)
    args = to_device(feeds, input_names, dev)
    outputs = outputs_to_numpy(vm["main"](*args))
    timer = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
    timer(*args)  # warm-up
    return list(timer(*args).results), outputs


class RpcMeasurer(Measurer):
    """Times libraries on a device behind an RPC tracker; many at once over every server with the key."""

    method = "rpc"
    batches = True

    def __init__(self, device: Device, target_kind: str = "llvm", repeat: int = 30, min_repeat_ms: int = 100,
                 timeout: float = 300.0):
        self.device, self.target_kind = device, target_kind
        self.repeat, self.min_repeat_ms, self.timeout = repeat, min_repeat_ms, timeout

    def identity(self):
        return {"method": self.method, "device": self.device.url}

    def description(self) -> str:
        return f"on {self.device.url}"

    def measure(self, job: Job) -> Measurement:
        session = open_session(self.device)
        try:
            samples, outputs = _with_timeout(
                lambda: run_remote(session, Path(job.library), job.feeds, job.input_names, self.target_kind,
                                   self.repeat, self.min_repeat_ms), self.timeout, f"measurement on {self.device.url}")
        except HwcError:
            raise
        except Exception as exc:
            raise HwcError(f"measurement on {self.device.url} failed: {first_line(exc)}") from exc
        return Measurement(from_samples("rpc", samples, number=1, threads=None, device=self.device.url), outputs)

    def measure_all(self, jobs: list[Job], cache: MeasurementCache, progress: Progress = SILENT) -> dict[str, Latency]:
        return measure_all(jobs, self.device, cache, self.target_kind, self.repeat, self.min_repeat_ms, progress)


# ------------------------------------------------------------- many at once
def job_key(library: Path, device: Device, repeat: int) -> str:
    digest = hashlib.sha256(Path(library).read_bytes()).hexdigest()[:16]
    return f"{device.key}:{digest}:r{repeat}"


def measure_all(jobs: list[Job], device: Device, cache: MeasurementCache, target_kind: str = "llvm",
                repeat: int = 10, min_repeat_ms: int = 20, progress: Progress = SILENT,
                max_attempts: int = 3) -> dict[str, Latency]:
    """Measure every job on the device's servers in parallel, one worker per free server.

    A worker whose server fails puts its job back for another worker and stops; the run fails
    (keeping every finished figure in the cache) only when no server is left or a job has failed
    ``max_attempts`` times.
    """
    results = {job.key: cache.get(job.key) for job in jobs if cache.get(job.key) is not None}
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        if job.key not in results:
            todo.put((job, 0))
    if todo.empty():
        progress(f"all {len(jobs)} measurements found in the cache")
        return results
    workers = max(1, min(free_servers(device), todo.qsize()))
    progress(f"measuring {todo.qsize()} libraries on {workers} server(s) of {device.url} "
             f"({len(results)} from the cache)")
    errors: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        session = None
        while True:
            try:
                job, attempts = todo.get_nowait()
            except queue.Empty:
                return
            try:
                session = session or open_session(device, timeout=60.0)
                samples, _ = _with_timeout(lambda: run_remote(session, job.library, job.feeds, job.input_names,
                                                              target_kind, repeat, min_repeat_ms),
                                           300.0, f"measurement on {device.url}")
            except Exception as exc:  # noqa: BLE001 - the server may be gone: hand the job back
                session = None
                with lock:
                    errors.append(f"worker {index}: {first_line(exc)}")
                    if attempts + 1 < max_attempts:
                        todo.put((job, attempts + 1))
                    else:
                        errors.append(f"{job.key}: failed {max_attempts} times")
                progress(f"a server of {device.url} failed ({first_line(exc)}); its job is queued again")
                if isinstance(exc, HwcError):  # no server could be had at all: this worker stops
                    return
                continue
            latency = from_samples("rpc", samples, number=1, threads=None, device=device.url)
            cache.put(job.key, latency)
            with lock:
                results[job.key] = latency
            progress("measured", done=len(results), total=len(jobs))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [job.key for job in jobs if job.key not in results]
    if missing:
        raise HwcError(f"{len(missing)} of {len(jobs)} measurements on {device.url} could not be made "
                       f"({errors[-1] if errors else 'no server answered'}); the {len(results)} finished ones are "
                       f"kept in {cache.path}: run again to resume")
    return results


# ------------------------------------------------------------- device check
def device_check(device: Device, target: Target, scratch: Path) -> dict:
    """Connect, ask the server who it is, and time a trivial kernel built for ``target`` there."""
    import tvm
    from tvm import te

    summary = tracker_summary(device)
    free = free_servers(device, summary)
    session = open_session(device)
    info = remote_info(session)
    n = 1 << 16
    a = te.placeholder((n,), name="a")
    b = te.compute((n,), lambda i: a[i] * 2.0 + 1.0, name="b")
    func = te.create_prim_func([a, b])
    kind = target.kind
    if kind == "cuda":
        import tvm.s_tir.dlight as dl

        with target.tvm_target():
            func = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(tvm.IRModule({"main": func}))
    library = export_library(tvm.compile(func, target=target.tvm_target()), scratch / "hwc_device_check.so",
                             target.cross_compiler)
    session.upload(str(library))
    remote = session.load_module(library.name)
    dev = remote_device(session, kind)
    x = np.arange(n, dtype=np.float32)
    xa, ya = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.zeros(n, np.float32), dev)
    remote["main"](xa, ya)
    correct = bool(np.allclose(ya.numpy(), x * 2 + 1))
    seconds = remote.time_evaluator("main", dev, number=10, repeat=5)(xa, ya).results
    local_version = tvm.__version__
    warning = None
    if info.get("tvm") and info["tvm"] != local_version:
        warning = f"remote TVM {info['tvm']} differs from local TVM {local_version}: libraries may not load"
    return {"device": device.url, "key": device.key, "free_servers": free, "remote": info,
            "local_tvm": local_version, "kernel": "y = 2x + 1 on 65536 floats", "kernel_correct": correct,
            "kernel_ms": float(np.median(seconds) * 1e3), "warning": warning}


def remote_info(session) -> dict:
    """What the server says about itself (servers started by ``python -m hwcompress.rpc_server``)."""
    try:
        return json.loads(session.get_function("hwc.remote_info")())
    except Exception:  # noqa: BLE001 - a plain TVM server has no such function
        return {"tvm": None, "note": "the server does not report its TVM version (plain tvm.exec.rpc_server); "
                                     "start it with python -m hwcompress.rpc_server to get it"}


def wait_for_key(device: Device, count: int, timeout: float = 30.0) -> None:
    """Block until ``count`` servers with the key are free (used by tests and scripts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if free_servers(device) >= count:
                return
        except HwcError:
            pass
        time.sleep(0.2)
    raise HwcError(f"{count} server(s) with key {device.key!r} did not register at {device.host}:{device.port} "
                   f"within {timeout:g} s")
