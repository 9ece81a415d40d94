"""How many threads TVM's runtime uses on this machine.

TVM's thread pool reads ``TVM_NUM_THREADS`` once, when it starts, and caps every later
``config_threadpool`` request at that figure. Without it TVM takes half the logical CPUs on x86
(to skip hyper-threads), which on a machine or VM without SMT leaves half of the cores idle:
measured on this project's 2-core VM, every TVM latency was a one-thread figure set against ONNX
Runtime on two, and MetaSchedule tuned kernels for one thread.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-thread siblings count once).

    Cached: TVM's runtime pins its threads, after which the affinity of this thread is one core.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def use_all_cores() -> None:
    """Let TVM's pool start with every physical core, unless the user chose a number."""
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int | None:
    """The largest data cache of this machine's first CPU (L3, or L2 where there is none), from
    sysfs; None where the kernel does not say."""
    largest = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()  # "32768K"
            units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
            value = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except (OSError, ValueError):  # unreadable, or not a size (an empty file in a container)
            continue
        largest = max(largest or 0, value)
    return largest
