"""Kernels too small to share: their parallel loops run serially.

A parallel loop costs a thread-pool launch and a barrier, a few microseconds whether its body is
large or not. Most kernels do far more work than that; the per-step kernels of an unrolled LSTM
do not (a [1, 96] x [96, 384] product and the gates' elementwise ops, a few hundred vector
instructions each, launched 80 times per direction per layer), and every one of them paid the
launch. ``serial_small_kernels`` counts the arithmetic a kernel executes (``work``: operations
per vector, times the iterations around them) and, under ``SERIAL_WORK``, makes its parallel
loops serial. It runs in the ``hwc_cpu`` TIR pipeline (``stack_buffers``), where loops are still
loops.

Measured (AMD Zen 4, 2 threads, microseconds parallel / serial, ``work`` in brackets): x*tanh-and-
sigmoid over 256 values 1.72 / 0.81 [786], 1024 values 2.01 / 1.78 [3090], 4096 values 4.25 / 5.79
[12306]; a [1, 96] x [96, 384] product 2.11 / 1.85 [6416], [1, 128] x [128, 512] 2.69 / 2.85
[~11400], [1, 256] x [256, 1024] 7.17 / 11.83 [45226]. Both kinds cross over near 8-10 thousand
operations, whatever the mix of arithmetic.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.tirx import expr as E
from tvm.tirx import stmt as S

from .tir_statements import rebuild

# Operations (``work``) below which one thread does the kernel sooner than a pool launch would
# (the crossover measured in the module docstring).
SERIAL_WORK = 8192


def work(node, trips: int = 1) -> int:
    """Arithmetic operations ``node`` executes run ``trips`` times (a vectorized loop's body counts
    once per vector; loops of unknown extent count once)."""
    if isinstance(node, S.SeqStmt):
        return sum(work(s, trips) for s in node.seq)
    if isinstance(node, S.For):
        extent = int(node.extent) if isinstance(node.extent, tirx.IntImm) else 1
        return work(node.body, trips if node.kind == S.ForKind.VECTORIZED else trips * extent)
    if isinstance(node, (S.AttrStmt, S.While)):
        return work(node.body, trips)
    if isinstance(node, S.IfThenElse):
        return work(node.then_case, trips) + (work(node.else_case, trips) if node.else_case is not None else 0)
    value = getattr(node, "value", None)
    return trips * max(1, _operations(value)) if value is not None else 0


def _operations(expr) -> int:
    """Arithmetic nodes of ``expr``: a vector exp written out as arithmetic is dozens, a
    multiply-add two (loads and index arithmetic are not counted)."""
    if expr is None or isinstance(expr, tvm.ir.expr.TensorLoad):
        return 0
    if isinstance(expr, E.Select):
        return 1 + _operations(expr.condition) + _operations(expr.true_value) + _operations(expr.false_value)
    if hasattr(expr, "a") and hasattr(expr, "b"):
        return 1 + _operations(expr.a) + _operations(expr.b)
    if hasattr(expr, "args") and hasattr(expr, "op"):  # an intrinsic call
        return 1 + sum(_operations(a) for a in expr.args)
    return _operations(getattr(expr, "value", None))


def _serial(node):
    """A parallel loop as a serial one; other statements as they are."""
    if isinstance(node, S.For) and node.kind == S.ForKind.PARALLEL:
        return S.For(node.loop_var, node.min, node.extent, S.ForKind.SERIAL, node.body, node.thread_binding,
                     node.annotations, node.step)
    return node


@tirx.transform.prim_func_pass(opt_level=0, name="hwc.SerialSmallKernels")
def serial_small_kernels(func, _mod, _ctx):
    """Parallel loops of kernels under ``SERIAL_WORK`` made serial (see the module docstring)."""
    if work(func.body) >= SERIAL_WORK:
        return func
    body = rebuild(func.body, _serial)
    return func if body is func.body else func.with_body(body)
