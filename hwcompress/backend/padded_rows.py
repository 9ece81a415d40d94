"""Rows appended for a register tile, carried through the elementwise ops between dense layers.

``dense_as_conv`` appends a few rows where no register tile divides a layer's rows (ViT's 197
tokens become 198) and slices them off after the layer. The ops after the layer (its bias, GELU)
then ran as a kernel of their own over the sliced rows, and the next dense layer's input was
padded again: a copy. Here an elementwise op of a sliced tensor (and constants along its last
axis) runs on the unsliced tensor, the slice after it, so that it joins the layer's epilogue; and a
pad putting back exactly the rows a slice took, read by a 1x1 conv whose output is only read with
those rows sliced off again, reads the unsliced tensor: the extra rows then hold values that
nothing reads. The ViT-Tiny example: 0.97-0.985x its time (its GELU and three of its biases joined
the dense layers' epilogues; AMD Zen 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from .dense_as_conv import static_shape
from .relax_rewrite import constant_value, rewrite_functions, unit_step_slice

_ELEMENTWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
                "relax.power", "relax.erf", "relax.tanh", "relax.sigmoid", "relax.exp", "relax.negative",
                "relax.sqrt", "relax.rsqrt", "relax.nn.relu", "relax.nn.silu", "relax.nn.gelu", "relax.clip"}


@dataclass(frozen=True)
class _RowSlice:
    """A tensor that is ``source``'s first ``rows`` along ``axis`` (not its last), reshaped
    without moving its last axis."""

    source: relax.Expr
    axis: int
    rows: int


def carry_padded_rows(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with elementwise ops moved above the row slices before them and pads that undo a
    row slice before a 1x1 conv dropped (see the module docstring)."""
    return rewrite_functions(_PaddedRows(mod), mod)


def _row_slice_of(call) -> tuple[int, int] | None:
    """(axis, rows) where ``call`` is a unit-step ``strided_slice`` keeping the first ``rows`` of
    one axis that is not the last; else None."""
    found = unit_step_slice(call)
    shape = static_shape(call.args[0]) if found is not None else None
    if shape is None or len(found[0]) != 1:
        return None
    (axis,), begins, (end,) = found
    axis %= len(shape)
    if axis == len(shape) - 1 or begins != [0] or not 0 < end < shape[axis]:
        return None
    return axis, end


@relax.expr_functor.mutator
class _PaddedRows(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.bound_to: dict = {}  # a binding's value (as given) -> its variable
        self.readers: dict = {}  # a variable -> the calls reading it (as given)
        for func in mod.functions.values():
            if not isinstance(func, relax.Function):
                continue
            for binding in (b for block in getattr(func.body, "blocks", []) for b in block.bindings):
                self.bound_to[binding.value] = binding.var
                for arg in getattr(binding.value, "args", []):
                    if isinstance(arg, relax.Var):
                        self.readers.setdefault(arg, []).append(binding.value)

    def visit_call_(self, call):
        given = call
        call = self.visit_expr_post_order(call)
        name = getattr(call.op, "name", "")
        rewritten = None
        if name in _ELEMENTWISE:
            rewritten = self.above_slice(call)
        elif name == "relax.nn.conv2d":
            rewritten = self.unpadded(given, call)
        return call if rewritten is None else rewritten

    def row_slice(self, expr) -> _RowSlice | None:
        """``expr`` as a row slice (through reshapes keeping the last axis), or None."""
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(bound, relax.Call):
            return None
        if getattr(bound.op, "name", "") == "relax.reshape":
            inner, shape, inner_shape = self.row_slice(bound.args[0]), static_shape(expr), static_shape(bound.args[0])
            return inner if inner and shape and inner_shape and shape[-1] == inner_shape[-1] else None
        found = _row_slice_of(bound)
        if found is None or getattr(bound.args[0].ty, "dtype", None) != "float32":
            return None
        return _RowSlice(bound.args[0], *found)

    def above_slice(self, call):
        """``call`` computed on the unsliced tensors, then sliced and reshaped, where its tensor
        operands are row slices alike and the rest constants along the last axis only."""
        shape = static_shape(call)
        slices, args = None, []
        for arg in call.args:
            value = constant_value(arg)
            if value is not None:
                if any(size != 1 for size in value.shape[:-1]):
                    return None
                args.append(arg)
                continue
            if not isinstance(getattr(arg, "ty", None), relax.TensorType):
                args.append(arg)  # an attribute-like operand (clip's bounds)
                continue
            found = self.row_slice(arg)
            if found is None or static_shape(arg) != shape:
                return None
            if slices is not None and (found.axis, found.rows, static_shape(found.source)) != \
                    (slices.axis, slices.rows, static_shape(slices.source)):
                return None
            slices = found
            args.append(found.source)
        if slices is None or shape is None:
            return None
        unsliced = self.builder_.emit(relax.Call(call.op, args, call.attrs))
        sliced = relax.op.strided_slice(unsliced, axes=[slices.axis], begin=[0], end=[slices.rows])
        return relax.op.reshape(sliced, shape)

    def unpadded(self, given, call):
        """``call`` (a 1x1 NHWC conv) reading the tensor a row slice took its input from, where its
        input pads exactly those rows back and its output is only read with them sliced off."""
        data = self.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else None
        if not isinstance(data, relax.Call) or getattr(data.op, "name", "") != "relax.nn.pad":
            return None
        found = self.row_slice(data.args[0])
        shape = static_shape(data)
        if found is None or shape is None or static_shape(found.source) != shape or found.axis not in (1, 2):
            return None
        widths = [int(w) for w in data.attrs.pad_width]
        added = [0] * (2 * len(shape))
        added[2 * found.axis + 1] = shape[found.axis] - found.rows
        weight = static_shape(call.args[1])
        attrs = call.attrs
        if widths != added or weight is None or weight[:2] != [1, 1] or attrs.data_layout != "NHWC" \
                or attrs.kernel_layout != "HWIO" or any(int(v) != 1 for v in list(attrs.strides) + list(attrs.dilation)) \
                or any(int(v) for v in attrs.padding):
            return None
        readers = self.readers.get(self.bound_to.get(given), [])
        if not readers or any((_row_slice_of(r) or (None, None))[0] != found.axis
                              or _row_slice_of(r)[1] > found.rows for r in readers):
            return None
        return relax.Call(call.op, [found.source, call.args[1]], call.attrs)
