"""LayerNorm written out in elementary ops, as one LayerNorm.

Below opset 17 ONNX has no LayerNormalization, and exporters write it out: ReduceMean, Sub, Pow,
ReduceMean, Add, Sqrt, Div, then Mul by the scale and Add of the shift. TVM ran that as three or
four kernels (the two means, their reductions scalar chains) where the op itself runs as one row
kernel (``row_kernels``): such a block with two LayerNorms and a dense layer between them ran 1.44x
ONNX Runtime's time (ONNX Runtime fuses the pattern itself). Here the chain, found from its
division, becomes ``layer_norm`` over the last axis, and a constant scale and shift after it (along
the last axis) become its own.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .dense_as_conv import static_shape
from .relax_rewrite import constant_value, rewrite_functions, scalar_value


def fold_layer_norms(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every LayerNorm over the last axis written out in elementary ops as one
    ``layer_norm`` (its scale and shift taken in where constants follow it)."""
    return rewrite_functions(_LayerNorms(mod), mod)


def _name(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _along_last_axis(expr, length: int) -> np.ndarray | None:
    """The values of a float32 constant spanning only the last axis (``length`` of them, or one)."""
    value = constant_value(expr)
    if value is None or value.dtype != np.float32 or any(size != 1 for size in value.shape[:-1]) \
            or (value.shape and value.shape[-1] not in (1, length)):
        return None
    return np.broadcast_to(value.reshape(-1), (length,)).astype(np.float32)


@relax.expr_functor.mutator
class _LayerNorms(relax.PyExprMutator):
    def bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    def last_axis_mean(self, expr):
        """The tensor ``expr`` is the mean of over its last axis (kept), or None."""
        call = self.bound(expr)
        if _name(call) != "relax.mean" or not bool(call.attrs.keepdims):
            return None
        shape = static_shape(call.args[0])
        axes = call.attrs.axis
        if shape is None or axes is None or [int(a) % len(shape) for a in axes] != [len(shape) - 1]:
            return None
        return call.args[0]

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        name = _name(call)
        rewritten = None
        if name == "relax.divide":
            rewritten = self.normalized(call)
        elif name in ("relax.multiply", "relax.add"):
            rewritten = self.affine(call, name == "relax.multiply")
        return call if rewritten is None else rewritten

    def normalized(self, call):
        """``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` as ``layer_norm(x)``."""
        centred, root = call.args
        sub, sqrt = self.bound(centred), self.bound(root)
        if _name(sub) != "relax.subtract" or _name(sqrt) != "relax.sqrt" or getattr(call.ty, "dtype", None) != "float32":
            return None
        x, mean = sub.args
        shape = static_shape(x)
        mean_of = self.last_axis_mean(mean)
        if shape is None or mean_of is None or not mean_of.same_as(x) or static_shape(call) != shape:
            return None
        plus = self.bound(sqrt.args[0])
        if _name(plus) != "relax.add" or scalar_value(plus.args[1]) is None:
            return None
        square = self.bound(self.last_axis_mean(plus.args[0]))
        if _name(square) == "relax.power":
            squares = square.args[0].same_as(centred) and scalar_value(square.args[1]) == 2.0
        else:
            squares = _name(square) == "relax.multiply" and all(a.same_as(centred) for a in square.args)
        if not squares:
            return None
        length = shape[-1]
        return relax.op.nn.layer_norm(x, relax.const(np.ones(length, np.float32)),
                                      relax.const(np.zeros(length, np.float32)), axes=[-1],
                                      epsilon=scalar_value(plus.args[1]))

    def affine(self, call, scaling: bool):
        """A constant scale (then shift) along the last axis after a ``layer_norm`` that has none
        yet, as that ``layer_norm``'s own."""
        norm, constant = call.args
        if _name(self.bound(norm)) != "relax.nn.layer_norm":
            constant, norm = call.args
        ln = self.bound(norm)
        if _name(ln) != "relax.nn.layer_norm" or static_shape(call) != static_shape(norm):
            return None
        length = static_shape(norm)[-1]
        value = _along_last_axis(constant, length)
        scale, shift = (constant_value(a) for a in ln.args[1:3])
        if value is None or scale is None or shift is None or np.any(shift != 0) or (scaling and np.any(scale != 1)):
            return None
        scale, shift = (scale * value, shift) if scaling else (scale, value)
        return relax.op.nn.layer_norm(ln.args[0], relax.const(scale.astype(np.float32)),
                                      relax.const(shift.astype(np.float32)), axes=[-1],
                                      epsilon=float(ln.attrs.epsilon))
