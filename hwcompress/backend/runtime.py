"""Loading an exported library into TVM's Relax VM, here or on a remote session's device."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_local(library: Path, feeds: dict[str, np.ndarray], input_names: list[str], device_kind: str = "cpu"):
    """Load an exported library in this process, on this machine's CPU or (``cuda``) first GPU;
    return the VM, its device and the inputs on it."""
    import tvm
    from tvm import relax

    if device_kind == "cuda":
        from .cuda_kernels import load_cuda_runtime

        load_cuda_runtime()
    device = tvm.device(device_kind, 0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    return vm, device, to_device(feeds, input_names, device)


def to_device(feeds: dict[str, np.ndarray], input_names: list[str], device) -> list:
    import tvm

    return [tvm.runtime.tensor(feeds[name], device) for name in input_names]


def outputs_to_numpy(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [r.numpy() for r in result]


def run_outputs(library: Path, inputs: list[dict[str, np.ndarray]], input_names: list[str],
                device_kind: str = "cpu") -> list[list[np.ndarray]]:
    """The library's outputs for each input, loaded once."""
    vm, device, _ = load_local(library, inputs[0], input_names, device_kind)
    return [outputs_to_numpy(vm["main"](*to_device(feed, input_names, device))) for feed in inputs]


def tvm_version() -> str:
    import tvm

    return tvm.__version__
