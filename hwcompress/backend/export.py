"""The one way a TVM module becomes a file: a shared library, linked by the target's cross compiler
where it has one (so that a board with only TVM's runtime loads it); for CUDA the kernels' binary is
inside it (``cuda_kernels``)."""

from __future__ import annotations

from pathlib import Path

from ..config.targets import Target


def export_library(module, path: str | Path, cross_compiler: str | None) -> Path:
    """Write ``module`` (an executable or a runtime module) as a shared library at ``path``."""
    if cross_compiler:
        from tvm.support import cc

        module.export_library(str(path), fcompile=cc.cross_compiler(cross_compiler))
    else:
        module.export_library(str(path))
    return Path(path)


def export(executable, target: Target, directory: Path, name: str) -> dict[str, str]:
    """Write the library. Returns the files written, each with a note for the report."""
    export_library(executable, directory / name, target.cross_compiler)
    note = f"TVM library for {target.name}"
    if target.kind == "cuda":
        note += (f": host code and the CUDA kernels, compiled by nvcc for {target.tvm_target_dict().get('arch')} "
                 f"(SASS and PTX); TVM's CUDA runtime loads them with no compiler on the device")
    return {name: note}
