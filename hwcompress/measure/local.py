"""Timing on this machine's CPU with TVM's ``time_evaluator``, in this process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..backend.runtime import load_local, outputs_to_numpy, run_outputs
from .latency import Job, Measurement, Measurer, from_samples


class LocalMeasurer(Measurer):
    """Warm-up, then ``repeat`` samples of ``number`` runs, on ``threads`` threads of this machine's
    CPU, or on its first GPU (``device_kind`` cuda: TVM's timer synchronizes the device)."""

    method = "local"
    runs_here = True

    def __init__(self, threads: int, repeat: int = 30, min_repeat_ms: int = 100, device_kind: str = "cpu",
                 device_name: str = "host cpu"):
        self.threads = threads
        self.repeat = repeat
        self.min_repeat_ms = min_repeat_ms
        self.device_kind = device_kind
        self.device_name = device_name

    def identity(self):
        return {"method": self.method, "threads": self.threads} | (
            {"device": self.device_name} if self.device_kind != "cpu" else {})

    def description(self) -> str:
        if self.device_kind != "cpu":
            return f"on this machine's {self.device_name}"
        return f"on this machine ({self.threads} threads)"

    def measure(self, job: Job) -> Measurement:
        with _tvm_threads(self.threads):
            vm, device, args = load_local(job.library, job.feeds, job.input_names, self.device_kind)
            outputs = outputs_to_numpy(vm["main"](*args))
            self._warm_up(vm, device, args)
            result = vm.time_evaluator("main", device, number=1, repeat=self.repeat,
                                       min_repeat_ms=self.min_repeat_ms, cooldown_interval_ms=0)(*args)
        latency = from_samples("local", list(result.results), number=1, threads=self.threads, device=self.device_name)
        return Measurement(latency, outputs)

    def measure_anchored(self, job: Job, anchor: Job, anchor_ms: float, rounds: int = 3) -> Measurement:
        """``job`` timed in alternating rounds with ``anchor`` (a fixed kernel whose figure is
        ``anchor_ms``), each round's samples scaled by ``anchor_ms`` over the anchor's median in
        that round: figures taken minutes apart are then on one scale. This VM's speed switches
        between modes (one library read 2.2 or 3.8 ms); a latency table filled across a switch
        predicted a quarter of one MobileNetV2 layer's channels to save 0.9 ms of a 3.4 ms model."""
        if self.device_kind != "cpu":
            return self.measure(job)
        samples = []
        with _tvm_threads(self.threads):
            timers = []
            for j in (anchor, job):
                vm, device, args = load_local(j.library, j.feeds, j.input_names)
                self._warm_up(vm, device, args)
                timer = vm.time_evaluator("main", device, number=1, repeat=max(1, self.repeat // rounds),
                                          min_repeat_ms=self.min_repeat_ms, cooldown_interval_ms=0)
                timers.append((vm, timer, args))
            outputs = outputs_to_numpy(timers[1][0]["main"](*timers[1][2]))
            for _ in range(rounds):
                reference = float(np.median(timers[0][1](*timers[0][2]).results)) * 1e3
                samples += [t * anchor_ms / reference for t in timers[1][1](*timers[1][2]).results]
        latency = from_samples("local", samples, number=1, threads=self.threads, device=self.device_name)
        return Measurement(latency, outputs)

    def _warm_up(self, vm, device, args) -> None:
        """Caches, the thread pool, page faults: one sample's worth of runs before the timed ones.
        A whole measurement's worth, as it was, doubled the time every figure took; with one
        sample MobileNetV2 and MNIST read 0.97-1.07x (medians of 6-12 alternating loads) what
        they read after the long warm-up, within this VM's spread."""
        vm.time_evaluator("main", device, number=1, repeat=1, min_repeat_ms=self.min_repeat_ms,
                          cooldown_interval_ms=0)(*args)

    def run_many(self, job: Job, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return run_outputs(job.library, inputs, job.input_names, self.device_kind)

    def kernel_times(self, job: Job) -> dict[str, float]:
        if self.device_kind != "cpu":  # kernels run asynchronously: a host-side hook would time the launches
            return {}
        return kernel_times(job.library, job.feeds, job.input_names)

    def baseline(self, job: Job, rounds: int) -> dict | None:
        if self.device_kind != "cpu":  # this ONNX Runtime runs on the CPU: no like-for-like figure
            return None
        return onnxruntime_baseline(job, self.threads, rounds)

    def ratio(self, job: Job, reference: Job, rounds: int = 5) -> float | None:
        if self.device_kind != "cpu":  # kernels run asynchronously: Python-side timing would miss them
            return None
        with _tvm_threads(self.threads):
            runners = {}
            for name, j in (("job", job), ("reference", reference)):
                vm, _, args = load_local(j.library, j.feeds, j.input_names)
                runners[name] = lambda main=vm["main"], args=args: main(*args)
            # Both run on TVM's one thread pool: no other runtime's spinning workers to wait out
            # (two SqueezeNet and two ShuffleNet libraries read the same ratios, within their
            # spread, with no pause as with 0.2 s; the search's candidates each took 2 s longer).
            medians = alternating_latency_ms(runners, rounds=rounds, repeat=10, pause_s=0.0)
        return float(np.median([a / b for a, b in zip(medians["job"], medians["reference"])]))


class _tvm_threads:
    """Pin TVM's thread pool size for a measurement (TVM_NUM_THREADS is read when the pool starts)."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        import tvm

        configure = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        if configure is not None:
            configure(1, self.threads)  # 1 = big cores; n threads
        return self

    def __exit__(self, *exc):
        return False


def kernel_times(library: Path, feeds: dict[str, np.ndarray], input_names: list[str], runs: int = 5) -> dict[str, float]:
    """Median milliseconds per TVM kernel (fused layer) of one run, from the VM's instrument hook.

    Each figure includes a return to Python between kernels, which leaves caches and worker
    threads colder than in an uninstrumented run: a conv measured 0.50 ms here ran 0.26 ms back to
    back. Compare these figures with each other (baseline vs candidate), not with a latency."""
    from tvm.relax import VMInstrumentReturnKind

    vm, _, args = load_local(library, feeds, input_names)
    vm["main"](*args)
    samples: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def hook(func, name, before_run, ret_value, *rest):
        if before_run:
            started[name] = time.perf_counter()
        else:
            samples.setdefault(name, []).append((time.perf_counter() - started.pop(name)) * 1e3)
        return VMInstrumentReturnKind.NO_OP

    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](*args)
    return {name: float(np.median(v)) * (len(v) // runs or 1) for name, v in samples.items()}


def alternating_latency_ms(runners: dict, rounds: int = 10, repeat: int = 10,
                           pause_s: float = 0.4) -> dict[str, list[float]]:
    """Per round, the median ms per call of each runner, timed in alternating rounds by the same
    Python loop (A, B, A, B, ...).

    A shared machine's speed drifts by tens of percent within a minute; timing A then B puts that
    drift into the ratio, while the ratio of neighbouring rounds cancels it. The pause before each
    round lets the other runtime's worker threads stop spinning: after its last run TVM's keep a
    core busy for about 0.18 s, ONNX Runtime's for 0.05 s; with a shorter pause ORT read up to 1.7x
    slower."""
    medians: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(pause_s)
            medians[name].append(median_call_ms(run, repeat, warmup=3))
    return medians


WARM_S = 0.03  # seconds of untimed calls before a round's timed ones, whatever the model's size
ROUND_S = 0.03  # seconds of timed calls a round lasts at least


def median_call_ms(run, repeat: int, warmup: int) -> float:
    """Median milliseconds of ``run()`` over at least ``repeat`` calls and ``ROUND_S`` seconds,
    after at least ``warmup`` untimed calls and ``WARM_S`` seconds. Counted in time as well as calls
    because after a pause the cores of a virtual machine run slowly for some milliseconds: a 0.3 ms
    model timed over 3 + 10 calls read 0.6-0.7 ms (TVM's workers, asleep after the pause) and 0.45-0.6
    (ONNX Runtime's) where 100 calls read 0.30-0.33 and 0.37-0.39 (AMD EPYC Zen 5 VM, 2 threads)."""
    started = time.perf_counter()
    calls = 0
    while calls < warmup or time.perf_counter() - started < WARM_S:
        run()
        calls += 1
    samples = []
    started = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - started < ROUND_S:
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e3)


def onnxruntime_baseline(job: Job, threads: int, rounds: int) -> dict:
    """ONNX Runtime (CPU, fp32 or the model's own QDQ) on the same model, inputs and thread count,
    timed in alternating rounds with the compiled library: what a user would get instead."""
    from ..model import reference

    session = reference.session(job.model, threads=threads)
    with _tvm_threads(threads):
        vm, _, args = load_local(job.library, job.feeds, job.input_names)
        main = vm["main"]
        medians = alternating_latency_ms({"onnxruntime": lambda: session.run(None, job.feeds),
                                          "tvm": lambda: main(*args)}, rounds=rounds, repeat=10, pause_s=0.2)
    ratios = [t / o for t, o in zip(medians["tvm"], medians["onnxruntime"])]
    return {"onnxruntime_ms": float(np.median(medians["onnxruntime"])), "tvm_ms": float(np.median(medians["tvm"])),
            "tvm_over_onnxruntime": float(np.median(ratios)), "rounds": rounds, "threads": threads,
            "how": "same machine, inputs and threads; alternating rounds of 10 calls each, median of the rounds' "
                   "ratios (ONNX Runtime's own graph optimizations on)"}
