"""Softmax and LayerNorm over the last axis on CPUs as hand-written kernels: rows in parallel,
each row's reductions accumulated in vector registers.

TVM's softmax is four blocks (maximum, exponentials, sum, quotients), its LayerNorm reductions
(mean, variance) then the normalization. Scheduled row by row (``default_schedule``), their
reductions stayed scalar: each a chain of dependent operations (an add's latency per element, no
reassociation allowed), and a row whose length no vector divides (ViT's 197 tokens) was not
vectorized at all. Here a row's reductions run over whole vectors lane by lane, then across the
lanes and the remaining elements; the elementwise passes run on whole vectors and one short one.
ViT-Tiny's attention softmax (3 x 197 x 197) took 0.084 ms, 0.040 so, ONNX Runtime's 0.027; its
LayerNorm (197 x 192) 24 us, 7 so, ONNX Runtime's 17; the whole ViT-Tiny example 0.90x its time
with the LayerNorm kernel (AMD Zen 5, 2 threads).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .dense_as_conv import static_shape
from .relax_rewrite import rewrite_functions

SCHEDULE = "hwc row kernel"  # what kernel_info calls these kernels' schedule


class _RowLoops:
    """The loops of one row ``r`` of a [rows, length] kernel: whole vectors of ``lanes``, then the
    rest (the row is at least one vector long)."""

    def __init__(self, T, r, length: int, lanes: int):
        self.T, self.r, self.length, self.lanes = T, r, length, lanes
        self.vectors, self.whole = length // lanes, length - length % lanes
        self.acc = T.alloc_buffer((lanes,), "float32")  # one partial result per lane

    def each(self, body) -> None:
        """``body(k)`` for every element: whole vectors, then the rest as one short vector."""
        T, lanes = self.T, self.lanes
        with T.serial(0, self.vectors) as v:
            with T.vectorized(0, lanes) as lane:
                body(v * lanes + lane)
        if self.whole < self.length:
            with (T.vectorized if self.length - self.whole > 1 else T.serial)(self.whole, self.length) as k:
                body(k)

    def reduce(self, into, combine, term) -> None:
        """``into[0]`` = ``term(k)`` of every element combined: lane by lane over whole vectors, the
        rest into the first lanes as one short vector, then across the lanes by halves (log2 of
        the lanes dependent steps, not one per lane: a 49-long row spent most of its time there)."""
        T, lanes, acc = self.T, self.lanes, self.acc
        with T.vectorized(0, lanes) as lane:
            T.buffer_store(acc, term(lane), [lane])
        with T.serial(1, self.vectors) as v:
            with T.vectorized(0, lanes) as lane:
                T.buffer_store(acc, combine(acc[lane], term(v * lanes + lane)), [lane])
        rest = self.length - self.whole
        if rest:
            with (T.vectorized if rest > 1 else T.serial)(0, rest) as lane:
                T.buffer_store(acc, combine(acc[lane], term(self.whole + lane)), [lane])
        half = lanes // 2
        while half > 1:
            with T.vectorized(0, half) as lane:
                T.buffer_store(acc, combine(acc[lane], acc[lane + half]), [lane])
            half //= 2
        T.buffer_store(into, combine(acc[0], acc[1]), [0])


def _row_kernel(name: str, rows: int, length: int, lanes: int, params: dict, body):
    """A scheduled PrimFunc over float32 buffers ``params`` (name -> shape; the last one written)
    running ``body(buffers, r, loops)`` for every row ``r`` in parallel, ``loops`` its ``_RowLoops``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "hwc.schedule": SCHEDULE})
            buffers = {arg: T.arg(arg, T.Buffer(shape, "float32")) for arg, shape in params.items()}
            with T.sblock("root"):
                with T.sblock(f"{name}_rows"):  # one opaque block under the root, as TVM's passes expect
                    with T.parallel(0, rows) as r:
                        body(T, buffers, r, _RowLoops(T, r, length, lanes))
    return builder.get().without_attr("global_symbol")  # named where it is added: kernels of other shapes share the name


def softmax_rows_kernel(rows: int, length: int, lanes: int):
    """Softmax of each row of a [rows, length] float32 buffer: the maximum, the exponentials into
    the output, their sum, the output scaled by its reciprocal."""
    from tvm import tirx

    def body(T, b, r, loops):
        x, y = b["x"], b["y"]
        total = T.alloc_buffer((1,), "float32")
        loops.reduce(total, tirx.max, lambda k: x[r, k])
        loops.each(lambda k: T.buffer_store(y, tirx.exp(x[r, k] - total[0]), [r, k]))
        loops.reduce(total, lambda a, c: a + c, lambda k: y[r, k])
        T.buffer_store(total, tirx.const(1.0, "float32") / total[0], [0])
        loops.each(lambda k: T.buffer_store(y, y[r, k] * total[0], [r, k]))

    return _row_kernel("softmax", rows, length, lanes, {"x": (rows, length), "y": (rows, length)}, body)


def layer_norm_rows_kernel(rows: int, length: int, lanes: int, epsilon: float):
    """LayerNorm of each row of a [rows, length] float32 buffer with per-column scale and shift
    [length]: the mean, then the mean square deviation from it (two passes, as exact as TVM's), each
    accumulated lane by lane, then ``(x - mean) / sqrt(variance + epsilon) * scale + shift``."""
    from tvm import tirx

    def body(T, b, r, loops):
        x, scale, shift, y = b["x"], b["scale"], b["shift"], b["y"]
        mean, spread = T.alloc_buffer((1,), "float32"), T.alloc_buffer((1,), "float32")
        inverse_length = tirx.const(1.0 / length, "float32")
        loops.reduce(mean, lambda a, c: a + c, lambda k: x[r, k])
        T.buffer_store(mean, mean[0] * inverse_length, [0])
        loops.reduce(spread, lambda a, c: a + c, lambda k: (x[r, k] - mean[0]) * (x[r, k] - mean[0]))
        T.buffer_store(spread, spread[0] * inverse_length, [0])
        T.buffer_store(spread, tirx.rsqrt(spread[0] + tirx.const(epsilon, "float32")), [0])
        loops.each(lambda k: T.buffer_store(y, (x[r, k] - mean[0]) * spread[0] * scale[k] + shift[k], [r, k]))

    return _row_kernel("layer_norm", rows, length, lanes,
                       {"x": (rows, length), "scale": (length,), "shift": (length,), "y": (rows, length)}, body)


def rewrite_row_kernels(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every float32 softmax or LayerNorm (with scale and shift) over the last axis of a static shape
    at least a vector long, as a call of its row kernel on the tensor seen as rows (reshapes only)."""
    return rewrite_functions(_RowKernels(mod, lanes), mod)


@relax.expr_functor.mutator
class _RowKernels(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op not in (tvm.ir.Op.get("relax.nn.softmax"), tvm.ir.Op.get("relax.nn.layer_norm")):
            return call
        shape = static_shape(call.args[0])
        if shape is None or getattr(call.args[0].ty, "dtype", None) != "float32" or shape[-1] < self.lanes:
            return call
        rows, length = int(np.prod(shape[:-1])), shape[-1]
        if call.op == tvm.ir.Op.get("relax.nn.softmax"):
            if int(call.attrs.axis) % len(shape) != len(shape) - 1:
                return call
            return self.by_rows(softmax_rows_kernel(rows, length, self.lanes), "softmax", call.args[0], [], shape)
        if [int(a) % len(shape) for a in call.attrs.axes] != [len(shape) - 1] \
                or not (bool(call.attrs.center) and bool(call.attrs.scale)):
            return call
        kernel = layer_norm_rows_kernel(rows, length, self.lanes, float(call.attrs.epsilon))
        return self.by_rows(kernel, "layer_norm", call.args[0], list(call.args[1:3]), shape)

    def by_rows(self, kernel, name: str, data, others: list, shape: list[int]):
        """``kernel`` called on ``data`` seen as [rows, last axis] (and ``others`` as they are), its
        result seen in ``shape`` again."""
        rows = [int(np.prod(shape[:-1])), shape[-1]]
        flat = self.builder_.emit(relax.op.reshape(data, rows))
        out = self.builder_.emit(relax.call_tir(self.builder_.add_func(kernel, name), [flat, *others],
                                                relax.TensorType(rows, "float32")))
        return relax.op.reshape(out, shape)
