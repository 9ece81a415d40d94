"""CUDA kernels compiled by nvcc into the library itself.

TVM 0.27's compiler hands the kernels' CUDA source to the module factory of TVM's CUDA runtime
(``libtvm_runtime_cuda.so``, shipped in the wheel), which compiles it through the
``tvm_callback_cuda_compile`` hook and keeps the binary. Without that runtime loaded (it links the
NVIDIA driver's ``libcuda.so.1``, absent on a build machine without a GPU) the module keeps the
source only, and a device's runtime can load it only with a CUDA compiler and Python at hand. So a
CUDA build loads TVM's CUDA runtime first, over a stand-in for the driver library where this
machine has none (``cuda_driver_stub.c``: every entry point says "no device", as the toolkit's link
stubs do), and compiles with nvcc for the target's arch: SASS for that arch plus its PTX, which a
newer GPU compiles at load time.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config.cache import default_cache_dir
from ..config.gpu import DRIVER_LIBRARY
from ..errors import HwcError, first_line

STUB_SOURCE = Path(__file__).with_name("cuda_driver_stub.c")


@functools.lru_cache(maxsize=1)
def driver_present() -> bool:
    """Whether the NVIDIA driver's library loads in this process."""
    try:
        ctypes.CDLL(DRIVER_LIBRARY, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def load_cuda_runtime(cache_dir: Path | None = None) -> None:
    """Make TVM's CUDA runtime part of this process (once), over the driver stub where there is no
    driver. A missing CUDA runtime library (libcudart) is one clear error."""
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    if not driver_present():
        ctypes.CDLL(str(_driver_stub(cache_dir)), mode=ctypes.RTLD_GLOBAL)
    import tvm

    library = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise HwcError(f"TVM's CUDA runtime ({library.name}) does not load here: {first_line(exc)} "
                       f"(it needs the CUDA 13 runtime library, libcudart.so.13, from the CUDA toolkit)") from exc
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise HwcError(f"{library} loaded but registered no CUDA module factory")


def _driver_stub(cache_dir: Path | None) -> Path:
    path = Path(cache_dir or default_cache_dir()) / "cuda" / "driver-stub" / DRIVER_LIBRARY
    if path.exists():
        return path
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise HwcError("building for a GPU on a machine without an NVIDIA driver needs a C compiler (cc) for "
                       "a stand-in of the driver library; none is on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        built = Path(work) / DRIVER_LIBRARY
        done = subprocess.run([compiler, "-shared", "-fPIC", f"-Wl,-soname,{DRIVER_LIBRARY}", "-o", str(built),
                               str(STUB_SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise HwcError(f"cannot build the driver stand-in: {(done.stderr.strip().splitlines() or ['?'])[0]}")
        built.replace(path)
    return path


def nvcc_arch_flags(arch: str) -> list[str]:
    """SASS for ``arch`` (sm_XY) and its PTX, so that a newer GPU still loads the kernels."""
    number = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]


@contextlib.contextmanager
def kernels_compiled_by_nvcc(tvm_target, cache_dir: Path | None = None):
    """While open, TVM's CUDA codegen puts nvcc's binary for ``tvm_target``'s arch into the module."""
    import tvm_ffi
    import tvm.support.nvcc as nvcc

    load_cuda_runtime(cache_dir)
    arch = str(tvm_target.attrs["arch"])
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_with_nvcc(code):
        with tvm_target:
            return nvcc.compile_cuda(code, target_format="fatbin", arch=nvcc_arch_flags(arch), compiler="nvcc")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_with_nvcc, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
