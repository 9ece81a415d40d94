"""Kernel-local buffers on the stack, where the compiler can keep them in registers.

TVM 0.27 lowers every ``local``-scope allocation on a CPU (and every ``global`` one of 1 KiB or
more) to a ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` call pair. The register-
blocked conv kernels allocate their accumulator tile (e.g. 14 pixels x 32 channels x 4 bytes) as a
``local`` buffer inside the parallel loop, so each tile paid two runtime calls per buffer and a
``memset``, and because the buffer came from a function call LLVM could not promote it to
registers: the accumulators went through memory. Measured on MobileNetV2's int8 1x1 conv 16->96
at 112x112 (AMD Zen 4): 0.204 ms -> 0.085 ms; its first depthwise conv 0.097 -> 0.074 ms.

``stack_buffers`` marks such allocations (constant size, up to ``STACK_LIMIT_BYTES``) so that
``LowerTVMBuiltin`` leaves them to the code generator, which makes them ``alloca``s at the
function's entry (once per thread, not per tile); larger or dynamic ones stay on the workspace.
The pass runs in the ``hwc_cpu`` TIR pipeline: TVM's default pipeline, then this pass right
before the host finalization that would lower the allocations.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.tirx import stmt as S
from tvm.tirx import compilation_pipeline

from .tir_statements import rebuild

PIPELINE = "hwc_cpu"
STACK_LIMIT_BYTES = 16 * 1024  # worker threads have MBs of stack; tiles are a few KB
_KEEP = "disable_lower_builtin"  # tvm::tirx::transform::kDisableLowerTVMBuiltin


def _constant_bytes(buffer) -> int | None:
    elements = 1
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        elements *= int(extent)
    dtype = tvm.DataType(str(buffer.dtype))
    return elements * dtype.bits * dtype.lanes // 8


def _on_stack(node):
    """A small constant-size kernel buffer marked to stay a stack allocation; other statements as they are."""
    if isinstance(node, S.AllocBuffer) and node.buffer.scope() in ("local", "global"):
        size = _constant_bytes(node.buffer)
        if size is not None and 0 < size <= STACK_LIMIT_BYTES and _KEEP not in node.annotations:
            return S.AllocBuffer(node.buffer, {**dict(node.annotations), _KEEP: tirx.IntImm("int32", 1)})
    return node


@tirx.transform.prim_func_pass(opt_level=0, name="hwc.StackBuffers")
def stack_buffers(func, _mod, _ctx):
    """Small constant-size kernel buffers as stack allocations (see the module docstring)."""
    body = rebuild(func.body, _on_stack)
    return func if body is func.body else func.with_body(body)


def _cpu_pipeline(**kwargs):
    pipeline, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default", **kwargs)
    from .small_kernels import serial_small_kernels

    return pipeline, (lambda: tvm.transform.Sequential([serial_small_kernels, stack_buffers, finalize_host()])), \
        finalize_device


compilation_pipeline.register_tir_pipeline(PIPELINE, _cpu_pipeline)
