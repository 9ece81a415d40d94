"""The NVIDIA GPU of this machine, read from the driver library (``libcuda.so.1``) directly: what a
target with ``arch: auto`` is built for and labelled as. No driver, no device, or a stand-in
library without the calls (``backend/cuda_driver_stub.c``) all mean: no GPU here."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

DRIVER_LIBRARY = "libcuda.so.1"
# CUdevice_attribute values of the CUDA driver API.
_MAX_THREADS_PER_BLOCK, _MAX_SHARED_MEMORY_PER_BLOCK, _WARP_SIZE = 1, 8, 10
_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76


@dataclass(frozen=True)
class Gpu:
    """The GPU found: its name and what a TVM target built for it needs."""

    name: str
    arch: str  # sm_XY
    max_shared_memory_per_block: int
    max_threads_per_block: int
    warp_size: int

    def target_attrs(self) -> dict:
        return {"arch": self.arch, "max_shared_memory_per_block": self.max_shared_memory_per_block,
                "max_threads_per_block": self.max_threads_per_block, "thread_warp_size": self.warp_size}


@functools.lru_cache(maxsize=1)
def gpu_found() -> Gpu | None:
    """GPU 0 as the driver reports it, or None."""
    try:
        driver = ctypes.CDLL(DRIVER_LIBRARY)
        if driver.cuInit(0) != 0:
            return None
        count, device = ctypes.c_int(0), ctypes.c_int(0)
        if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        if driver.cuDeviceGet(ctypes.byref(device), 0) != 0:
            return None
        name = ctypes.create_string_buffer(256)
        if driver.cuDeviceGetName(name, len(name), device) != 0:
            return None

        def attribute(which: int) -> int:
            value = ctypes.c_int(0)
            if driver.cuDeviceGetAttribute(ctypes.byref(value), which, device) != 0:
                raise OSError(f"cuDeviceGetAttribute({which}) failed")
            return value.value

        return Gpu(name=name.value.decode(errors="replace"),
                   arch=f"sm_{attribute(_COMPUTE_CAPABILITY_MAJOR)}{attribute(_COMPUTE_CAPABILITY_MINOR)}",
                   max_shared_memory_per_block=attribute(_MAX_SHARED_MEMORY_PER_BLOCK),
                   max_threads_per_block=attribute(_MAX_THREADS_PER_BLOCK), warp_size=attribute(_WARP_SIZE))
    except (OSError, AttributeError):  # no driver, or a stand-in without these entry points
        return None
