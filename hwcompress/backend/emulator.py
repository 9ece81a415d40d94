"""Running an aarch64 build on this machine under qemu-aarch64 user emulation, to check its outputs.

With no board at hand, an arm-a72 library can still be checked for correctness: ``hwc-run-vm``
(``run_vm.cc``, a small C++ program over TVM's runtime) is cross-compiled for aarch64 and run by
qemu-aarch64 beside TVM's own aarch64 runtime libraries, taken from the apache-tvm and
apache-tvm-ffi wheels of the versions installed here (downloaded once with pip into the cache).
Emulated time says nothing about the board's speed: latency still needs the device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import HwcError
from ..config.cache import default_cache_dir

QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's cross libc, which the cross compiler links against
RUNTIME_LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}
DRIVER = "hwc-run-vm"
RUN_TIMEOUT_S = 1800


def is_aarch64(target) -> bool:
    return str(target.tvm_target_spec.get("mtriple", "")).startswith("aarch64")


def unavailable_reason(target) -> str | None:
    """Why ``target``'s artifacts cannot run under emulation here (None: they can)."""
    if not is_aarch64(target):
        return f"no emulator for {target.name}'s code"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (tools/install-system-deps.sh installs Debian's qemu-user)"
    if not target.cross_compiler or shutil.which(target.cross_compiler) is None:
        return f"the cross compiler {target.cross_compiler!r} is not installed"
    if not Path(SYSROOT, "lib").is_dir():
        return f"no aarch64 C library in {SYSROOT} (Debian: g++-aarch64-linux-gnu)"
    return None


def runtime_dir(cache_dir: Path | None = None) -> Path:
    """Where the aarch64 runtime for the TVM installed here lives (``HWC_AARCH64_RUNTIME`` overrides)."""
    if os.environ.get("HWC_AARCH64_RUNTIME"):
        return Path(os.environ["HWC_AARCH64_RUNTIME"])
    versions = "-".join(f"{name}{metadata.version(name)}" for name in RUNTIME_LIBS)
    return Path(cache_dir or default_cache_dir()) / "emulation" / f"aarch64-{versions}"


def ensure_runtime(compiler: str, cache_dir: Path | None = None) -> Path:
    """The directory holding the aarch64 TVM runtime and ``hwc-run-vm``, made on first use."""
    directory = runtime_dir(cache_dir)
    if (directory / DRIVER).exists():
        return directory
    if os.environ.get("HWC_AARCH64_RUNTIME"):  # the user's own folder of runtime libraries
        missing = [Path(member).name for member in RUNTIME_LIBS.values() if not (directory / Path(member).name).exists()]
        if missing:
            raise HwcError(f"HWC_AARCH64_RUNTIME={directory} lacks {', '.join(missing)} (from the aarch64 "
                           f"apache-tvm / apache-tvm-ffi wheels)")
        _build_driver(compiler, directory)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".making-"))
    try:
        _fetch_runtime_libraries(work)
        _build_driver(compiler, work)
        work.rename(directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if not (directory / DRIVER).exists():  # else another process made it meanwhile
            raise
    return directory


def _fetch_runtime_libraries(work: Path) -> None:
    wheels = work / "wheels"
    specs = [f"{name}=={metadata.version(name)}" for name in RUNTIME_LIBS]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_aarch64", "--python-version",
               f"{sys.version_info.major}{sys.version_info.minor}", "-d", str(wheels), *specs]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HwcError(f"cannot download TVM's aarch64 runtime ({' '.join(specs)}) with pip: "
                       f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}; on a machine without "
                       f"network, unpack those wheels' {', '.join(RUNTIME_LIBS.values())} into a folder and set "
                       f"HWC_AARCH64_RUNTIME to it")
    for name, member in RUNTIME_LIBS.items():
        wheel = next(wheels.glob(name.replace("-", "_") + "-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            (work / Path(member).name).write_bytes(archive.read(member))
    shutil.rmtree(wheels)


def _build_driver(compiler: str, work: Path) -> None:
    import tvm_ffi

    source = Path(__file__).with_name("run_vm.cc")
    include = Path(tvm_ffi.__file__).parent / "include"
    command = [compiler, "-O2", "-std=c++17", f"-I{include}", str(source), "-o", str(work / DRIVER),
               f"-L{work}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HwcError(f"cannot build {DRIVER} for aarch64: {(done.stderr.strip().splitlines() or ['?'])[0]}")


def run_emulated(library: Path, feeds: dict[str, np.ndarray], input_names: list[str], runtime: Path) -> list[np.ndarray]:
    """The outputs of the aarch64 ``library`` on ``feeds``, computed under qemu-aarch64 with the
    runtime folder from ``ensure_runtime``."""
    with tempfile.TemporaryDirectory(prefix="hwc-qemu-") as tmp:
        args = []
        for i, name in enumerate(input_names):
            value = np.ascontiguousarray(feeds[name])
            path = Path(tmp) / f"input_{i}.bin"
            value.tofile(path)
            args.append(f"{value.dtype}:{'x'.join(map(str, value.shape)) or 'scalar'}:{path}")
        command = [QEMU, "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={runtime}", str(runtime / DRIVER),
                   str(Path(library).resolve()), tmp, *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise HwcError(f"the emulated run of {library} took over {RUN_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise HwcError(f"the emulated run of {library} failed: "
                           f"{(done.stderr.strip().splitlines() or [f'exit code {done.returncode}'])[-1]}")
        outputs = []
        for line in done.stdout.splitlines():
            index, dtype, shape = line.split()
            dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
            outputs.append(np.fromfile(Path(tmp) / f"output_{index}.bin", dtype=dtype).reshape(dims))
        return outputs
