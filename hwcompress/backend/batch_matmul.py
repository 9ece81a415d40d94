"""Products of two activations (attention's ``Q K^T`` and ``softmax(.) V``) on CPUs as one
hand-written kernel for all the batch's products, whatever their number.

``C[b] = A[b] @ B[b]`` for every ``b`` of a batch of products (heads, windows times heads). The
operands are read where the layout ops that made them put their elements (``tensor_views``):
the projections themselves, not the heads' split and K's transpose written out as copies. The
right-hand matrices are first packed, all of them in one parallel pass, into rows of whole vectors
(zero columns up to a vector's multiple), unless their rows already are whole vectors side by side
(V's heads); then every (product, tile of rows) runs in parallel, a register tile of ``rows x
vectors`` accumulators per step of the depth: one broadcast of ``A``'s element per row, one load
per vector, an FMA each. The attention scale after ``Q K^T`` is applied as the tile is stored, and
only the real columns are written.

The 1x1-conv route this replaces needed a slice, a weight-packing kernel and a conv per product,
and a concat; above 16 products (Swin's 64 windows x 3 heads) it fell back to TVM's generic matmul:
such a window attention ran 1.6-1.8x ONNX Runtime's time, its ``Q K^T`` alone 1 ms for 15 M
multiply-adds; 0.69-0.73x with this kernel (AMD Zen 5, 2 threads). Reading through the heads'
split rather than copying it: that block 0.94-0.96x its time, the ViT-Tiny example 0.985x.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..config.vector_unit import VectorUnit
from .dense_as_conv import static_shape
from .relax_rewrite import scalar_value
from .tensor_views import View, read_through

SCHEDULE = "hwc batched matmul"  # what kernel_info calls these kernels' schedule


@dataclass(frozen=True)
class Product:
    """A batch of ``batch`` products [rows, depth] @ [depth, cols], ``left`` and ``right`` the
    ``View``s ([batch, rows, depth], [batch, depth, cols]) of the tensors the kernel reads, every
    result multiplied by ``scale``."""

    batch: int
    rows: int
    depth: int
    cols: int
    left: View
    right: View
    scale: float = 1.0

    @staticmethod
    def of(batch: int, rows: int, depth: int, cols: int, transposed: bool = False, scale: float = 1.0) -> "Product":
        """Products of contiguous tensors [batch, rows, depth] and [batch, depth, cols] (stored
        [batch, cols, depth] where ``transposed``)."""
        right = View.of((batch, cols, depth)).permuted((0, 2, 1)) if transposed else View.of((batch, depth, cols))
        return Product(batch, rows, depth, cols, View.of((batch, rows, depth)), right, scale)


def register_tile(unit: VectorUnit) -> tuple[int, int]:
    """(rows, vectors) of the accumulator tile: two vectors of columns, and as many rows as the
    registers left after them and one broadcast hold."""
    vectors = 2
    return (unit.registers - vectors - 1) // vectors, vectors


def batch_matmul_kernel(p: Product, unit: VectorUnit):
    """The PrimFunc computing ``c[b] = scale * left[b] @ right[b]``, reading the buffers ``a`` and
    ``b`` the views ``p.left`` and ``p.right`` are of."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    lanes = unit.lanes
    tile_rows, tile_vectors = register_tile(unit)
    tile_rows = min(tile_rows, p.rows)
    vectors = -(-p.cols // lanes)
    # Packed unless its rows are whole vectors lying side by side in the tensor read.
    pack = p.cols % lanes != 0 or not p.right.contiguous(2)
    row_tiles, last_rows = -(-p.rows // tile_rows), p.rows % tile_rows or tile_rows
    zero = tirx.const(0.0, "float32")

    def left(a, b, row, k):
        return a[tuple(p.left.source_index([b, row, k]))]

    def right(bm, b, k, col):
        return bm[tuple(p.right.source_index([b, k, col]))]

    def packed(bp, b, k, vector, lane):
        return bp[b, vector, k, lane] if pack else right(bp, b, k, vector * lanes + lane)

    def tile(a, bp, c, b, row0, rows: int, col_vector, count: int):
        """One register tile: ``rows`` rows from ``row0``, ``count`` vectors from ``col_vector``."""
        acc = T.alloc_buffer((rows, count * lanes), "float32")
        for r in range(rows):
            with T.vectorized(0, count * lanes) as j:
                T.buffer_store(acc, zero, [r, j])
        with T.serial(0, p.depth) as k:
            for r in range(rows):  # one broadcast of a[row, k] serves the tile's vectors
                for v in range(count):
                    with T.vectorized(0, lanes) as lane:
                        T.buffer_store(acc, acc[r, v * lanes + lane]
                                       + left(a, b, row0 + r, k) * packed(bp, b, k, col_vector + v, lane),
                                       [r, v * lanes + lane])
        for v in range(count):
            store(acc, c, b, row0, rows, col_vector, v)

    def store(acc, c, b, row0, rows: int, col_vector, v: int):
        """Vector ``v`` of the tile into ``c``, scaled, as many of its lanes as are real columns
        (all of them unless it is the last vector of the row)."""
        def write(width: int):
            for r in range(rows):
                with T.vectorized(0, width) as lane:
                    value = acc[r, v * lanes + lane]
                    if p.scale != 1.0:
                        value = value * tirx.const(p.scale, "float32")
                    T.buffer_store(c, value, [b, row0 + r, (col_vector + v) * lanes + lane])
        tail = p.cols % lanes
        if not tail:
            write(lanes)
            return
        if isinstance(col_vector, int):  # the last block: its vectors are known
            if col_vector + v < vectors - 1:
                write(lanes)
            else:
                write(tail)
            return
        write(lanes)  # a block of the loop over whole blocks: never the last vector

    def pack_vector(bm, bp, b, v, width: int):
        """Vector ``v`` of the right-hand matrix ``b``'s columns (``width`` of them real, zeros
        after) down the whole depth into ``bp[b, v]`` ([depth, lane]: a tile's loads then walk
        memory in order), a whole vector at a time (loaded, or gathered where its columns are not
        side by side: K's rows)."""
        with T.serial(0, p.depth) as k:
            if width == lanes:
                with T.vectorized(0, lanes) as lane:
                    T.buffer_store(bp, right(bm, b, k, v * lanes + lane), [b, v, k, lane])
            else:
                with T.serial(0, width) as lane:
                    T.buffer_store(bp, right(bm, b, k, v * lanes + lane), [b, v, k, lane])
                with T.vectorized(width, lanes) as lane:
                    T.buffer_store(bp, zero, [b, v, k, lane])

    def row_of_tiles(a, bp, c, b, row0, rows: int):
        """Every column block of ``rows`` rows: whole blocks in a loop, the rest after it."""
        whole_blocks = (vectors - (1 if p.cols % lanes else 0)) // tile_vectors
        with T.serial(0, whole_blocks) as block:
            tile(a, bp, c, b, row0, rows, block * tile_vectors, tile_vectors)
        rest = vectors - whole_blocks * tile_vectors
        while rest > 0:
            count = min(rest, tile_vectors)
            tile(a, bp, c, b, row0, rows, vectors - rest, count)
            rest -= count

    def last_apart(index, count: int, alike: bool, every, last):
        """``every()`` for each ``index`` of ``count`` where the last is ``alike``, else ``last()``
        for the last one (a shorter tile or vector) and ``every()`` for the others."""
        if alike:
            every()
            return
        with T.If(index < count - 1):
            with T.Then():
                every()
            with T.Else():
                last()

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("matmul")
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "hwc.schedule": SCHEDULE})
            a = T.arg("a", T.Buffer(p.left.source_shape, "float32"))
            bm = T.arg("b", T.Buffer(p.right.source_shape, "float32"))
            c = T.arg("c", T.Buffer((p.batch, p.rows, p.cols), "float32"))
            with T.sblock("root"):
                with T.sblock("batch_matmul_tiles"):  # one opaque block under the root, as TVM's passes expect
                    bp = bm
                    if pack:
                        bp = T.alloc_buffer((p.batch, vectors, p.depth, lanes), "float32")
                        with T.parallel(0, p.batch * vectors) as task:
                            b, v = task // vectors, task % vectors
                            last_apart(v, vectors, p.cols % lanes == 0, lambda: pack_vector(bm, bp, b, v, lanes),
                                       lambda: pack_vector(bm, bp, b, vectors - 1, p.cols % lanes))
                    with T.parallel(0, p.batch * row_tiles) as task:
                        b, t = task // row_tiles, task % row_tiles
                        last_apart(t, row_tiles, last_rows == tile_rows,
                                   lambda: row_of_tiles(a, bp, c, b, t * tile_rows, tile_rows),
                                   lambda: row_of_tiles(a, bp, c, b, (row_tiles - 1) * tile_rows, last_rows))
    return builder.get().without_attr("global_symbol")  # named where it is added: kernels of other shapes share the name


def rewrite_batch_matmuls(mod: tvm.IRModule, unit: VectorUnit) -> tvm.IRModule:
    """Every float32 matmul of two activations with static shapes (the same batch of products on
    both sides, or a 2-D right-hand side) as a call of its ``batch_matmul_kernel``: the layout ops
    that made its operands (heads split by reshape, transpose, slice; K transposed) read through,
    a scalar constant multiplying its result applied as the result is stored."""
    from .relax_rewrite import rewrite_functions

    return rewrite_functions(_BatchMatmuls(mod, unit), mod)


@relax.expr_functor.mutator
class _BatchMatmuls(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, unit: VectorUnit):
        super().__init__(mod)
        self.unit = unit
        self.products: dict = {}  # kernel GlobalVar -> its Product

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        op = getattr(call.op, "name", "")
        if op == "relax.matmul":
            return self.product(call)
        if op == "relax.multiply":
            return self.scaled(call)
        return call

    def product(self, call):
        from .relax_rewrite import bound_constant

        a, b = call.args
        if bound_constant(self, b) is not None or any(getattr(x.ty, "dtype", None) != "float32" for x in (a, b)):
            return call  # a constant right-hand side is a layer's weights: dense_as_conv's
        shape, right = static_shape(a), static_shape(b)
        if shape is None or right is None or len(shape) < 2 or len(right) < 2:
            return call
        if len(right) == 2:
            batch, rows = 1, int(np.prod(shape[:-1]))
        elif shape[:-2] == right[:-2]:
            batch, rows = int(np.prod(shape[:-2])), shape[-2]
        else:
            return call  # a broadcast batch: left to TVM's matmul
        depth, cols = right[-2:]
        (a, a_scale), (b, b_scale) = self.unscaled(a), self.unscaled(b)
        (a, left), (b, right) = read_through(self, a), read_through(self, b)
        p = Product(batch, rows, depth, cols, left.reshaped((batch, rows, depth)), right.reshaped((batch, depth, cols)),
                    a_scale * b_scale)
        return self.call_kernel(p, [a, b], [*shape[:-1], cols])

    def unscaled(self, operand) -> tuple:
        """(``operand``, 1) or, where it is a tensor times a scalar constant (CVNets scales Q before
        its product), (that tensor, the scalar): the kernel applies the scalar to the products."""
        bound = self.lookup_binding(operand) if isinstance(operand, relax.Var) else None
        if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.multiply":
            for tensor, factor in (bound.args, bound.args[::-1]):
                value = scalar_value(factor)
                if value is not None and static_shape(tensor) == static_shape(operand):
                    return tensor, value
        return operand, 1.0

    def scaled(self, call):
        data, factor = call.args
        value = scalar_value(factor)
        if value is None or not isinstance(data, relax.Var):
            return call
        bound = self.lookup_binding(data)
        if not isinstance(bound, relax.Call) or getattr(bound.op, "name", "") != "relax.reshape":
            return call  # (a split's part, a tuple's item: not a product's result)
        kernel_call = self.lookup_binding(bound.args[0]) if isinstance(bound.args[0], relax.Var) else None
        gvar = kernel_call.args[0] if isinstance(kernel_call, relax.Call) and kernel_call.args else None
        if gvar not in self.products or static_shape(call) != static_shape(data):
            return call
        p = self.products[gvar]
        scaled = dataclasses.replace(p, scale=p.scale * value)
        return self.call_kernel(scaled, list(kernel_call.args[1].fields), static_shape(data))

    def call_kernel(self, p: Product, sources: list, out_shape: list[int]):
        """The kernel of ``p`` called on the tensors its views read, its result seen in ``out_shape``."""
        gvar = self.builder_.add_func(batch_matmul_kernel(p, self.unit), "matmul")
        self.products[gvar] = p
        out = self.builder_.emit(relax.call_tir(gvar, sources, relax.TensorType([p.batch, p.rows, p.cols], "float32")))
        return relax.op.reshape(out, out_shape)
