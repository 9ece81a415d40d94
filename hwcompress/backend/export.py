"""The one way a TVM module becomes a file: a shared library, linked by the target's cross compiler
where it has one (so that a board with only TVM's runtime loads it), plus nvcc's device code for CUDA."""

from __future__ import annotations

from pathlib import Path

from ..config.targets import Target
from ..errors import HwcError, first_line


def export_library(module, path: str | Path, cross_compiler: str | None) -> Path:
    """Write ``module`` (an executable or a runtime module) as a shared library at ``path``."""
    if cross_compiler:
        from tvm.support import cc

        module.export_library(str(path), fcompile=cc.cross_compiler(cross_compiler))
    else:
        module.export_library(str(path))
    return Path(path)


def export(executable, target: Target, directory: Path, name: str) -> dict[str, str]:
    """Write the library and, for CUDA, the device code compiled by nvcc. Returns the files written,
    each with a note for the report."""
    export_library(executable, directory / name, target.cross_compiler)
    files = {name: f"TVM library for {target.name}"}
    if target.kind == "cuda":
        arch = target.tvm_target_spec.get("arch", "sm_75")
        fatbin = f"{Path(name).stem}.{arch}.fatbin"
        (directory / fatbin).write_bytes(_nvcc_fatbin(executable, target))
        files[fatbin] = (f"CUDA kernels compiled by nvcc for {arch}; {name} holds the host code and the "
                         f"kernels' CUDA source (this TVM wheel has no CUDA runtime)")
    return files


def _nvcc_fatbin(executable, target: Target) -> bytes:
    import tvm.support.nvcc as nvcc

    sources = [m.inspect_source("") for m in _walk(executable.mod) if m.kind == "cuda"]
    if not sources:
        raise HwcError(f"TVM produced no CUDA kernels for {target.name}")
    try:
        with target.tvm_target():
            return bytes(nvcc.compile_cuda("\n".join(sources), target_format="fatbin", compiler="nvcc"))
    except Exception as exc:  # nvcc errors arrive as RuntimeError with the compiler's output
        raise HwcError(f"nvcc failed to compile the CUDA kernels for {target.name}: "
                       f"{first_line(exc)}") from exc


def _walk(module):
    yield module
    for child in module.imports:
        yield from _walk(child)
