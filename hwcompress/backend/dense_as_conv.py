"""Fully connected layers as 1x1 convolutions, so that they get the register-blocked conv kernel.

``x @ W`` with a constant 2-D ``W`` is a 1x1 conv: ``x`` reshaped (no data moves) to one NHWC
image whose ``rows`` are the pixels of one row, ``[1, 1, rows, K]``, so that the conv's register
tile spans several rows and each weight vector loaded serves all of them; ``W`` as HWIO
``[1, 1, K, N]`` at compile time; the result reshaped back. Where no register tile divides the
rows (a prime count of tokens), a few zero rows are appended (sliced off after), or else ``rows``
images of one pixel, ``[rows, 1, 1, K]``, the weights re-read per row. (A matmul of two activations,
attention's, is ``batch_matmul``'s.) Left as a matmul, a classifier head had no schedule but the generic one:
MobileNetV2's 1280 x 1000 layer took 0.9 ms (a sixth of the model) where ONNX Runtime takes about
0.1; as a conv it streams its weights once at the vector units' pace.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..config.vector_unit import VectorUnit
from .cpu_schedules import choose_tiles
from .relax_rewrite import bound_constant, rewrite_functions

_MATMUL = tvm.ir.Op.get("relax.matmul")
ROW_PADDING = 16  # extra zero rows, at most (and an eighth of the rows), that let a register tile divide them


def static_shape(expr) -> list[int] | None:
    return type_shape(expr.ty)


def type_shape(ty) -> list[int] | None:
    """The static shape of a tensor type; None where it is not static (or not a tensor)."""
    try:
        return [int(d) for d in getattr(ty, "shape", None).values]
    except (AttributeError, TypeError):
        return None


def matmul_as_conv(x, weight: np.ndarray, out_dtype: str, pad_value: float = 0.0, depth_multiple: int = 1,
                   unit: VectorUnit | None = None):
    """``x @ weight`` written as a 1x1 NHWC conv2d over ``x``'s rows (``_as_image``, reshaped
    there and back where needed); the depth (K) is padded to a multiple of ``depth_multiple``
    (``x`` with ``pad_value``, ``weight`` with zeros). None where ``x``'s shape is not static."""
    shape = static_shape(x)
    if shape is None or len(shape) < 2:
        return None
    depth = shape[-1]
    extra = -depth % depth_multiple
    data, back = _as_image(x, shape, unit)
    if extra:
        data = relax.op.nn.pad(data, [0, 0, 0, 0, 0, 0, 0, extra], pad_value=pad_value)
    kernel = np.ascontiguousarray(np.pad(weight, [(0, extra), (0, 0)]).reshape(1, 1, depth + extra, weight.shape[1]))
    return back(relax.op.nn.conv2d(data, relax.const(kernel), data_layout="NHWC", kernel_layout="HWIO",
                                   out_dtype=out_dtype), weight.shape[1])


def _as_image(x, shape: list[int], unit: VectorUnit | None):
    """(``x`` [..., K] as the NHWC image the conv reads, the function taking the conv's output back
    to ``x``'s rows): an NHWC tensor's own [1, H, W, K] (no reshape before or after, so the ops
    after it fuse into the conv's epilogue); else one row of pixels [1, 1, rows, K] where a
    register tile divides the rows, or would with a few zero rows appended (``ROW_PADDING``; ViT's
    197 tokens: the rows sliced off after); else one-pixel images, the weights re-read per row (a
    classifier's one row stays one pixel: padding it would multiply its work)."""
    rows, depth = shape[:-1], shape[-1]

    def tiled(width):
        return unit is not None and width > 1 and choose_tiles(width, 2 * unit.lanes, unit) is not None

    if len(rows) == 3 and rows[0] == 1 and tiled(rows[2]):
        return x, lambda out, width: out
    count = int(np.prod(rows))
    padded = next((c for c in range(count, count + min(ROW_PADDING, count // 8) + 1) if tiled(c)), None)
    if padded is None:
        image = [count, 1, 1]
        return (relax.op.reshape(x, [*image, depth]),
                lambda out, width: relax.op.reshape(out, [*rows, width]))
    data = relax.op.reshape(x, [1, 1, count, depth])
    if padded > count:
        data = relax.op.nn.pad(data, [0, 0, 0, 0, 0, padded - count, 0, 0])

    def back(out, width):
        if padded > count:
            out = relax.op.strided_slice(out, axes=[2], begin=[0], end=[count])
        return relax.op.reshape(out, [*rows, width])
    return data, back


def dense_as_conv(mod: tvm.IRModule, unit: VectorUnit | None = None) -> tvm.IRModule:
    """Every float32 matmul by a constant 2-D weight rewritten as a 1x1 conv (its rows along one
    image row where ``unit``'s register tile divides them)."""
    return rewrite_functions(_Rewriter(mod, unit), mod)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, unit: VectorUnit | None):
        super().__init__(mod)
        self.unit = unit

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != _MATMUL:
            return call
        value = bound_constant(self, call.args[1])
        if value is None or value.ndim != 2 or value.dtype != np.float32 or getattr(call.args[0].ty, "dtype", None) != "float32":
            return call
        conv = matmul_as_conv(call.args[0], value, "float32", unit=self.unit)
        return call if conv is None else conv
