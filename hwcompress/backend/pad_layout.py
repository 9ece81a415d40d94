"""Move constant padding to the NHWC side of the layout conversion's transposes.

Relax's ``ConvertLayout`` has no layout rule for ``nn.pad``: a pad in front of a conv that was
converted to NHWC stays in NCHW, wrapped in a transpose to NCHW before it and one back after it.
The int8 lowering pads explicitly (with the input's zero point, which the conv's own zero padding
cannot express), so without this every padded int8 conv moved its input through memory three
times. ``permute_dims(pad(x), to_nhwc)`` becomes ``pad(permute_dims(x, to_nhwc))`` with the pad
widths permuted the same way, and a transpose that undoes the one before it is dropped.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .relax_rewrite import rewrite_functions

_PAD = tvm.ir.Op.get("relax.nn.pad")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def pads_after_transposes(mod: tvm.IRModule) -> tvm.IRModule:
    return rewrite_functions(_Mover(mod), mod)


@relax.expr_functor.mutator
class _Mover(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != _PERMUTE or call.attrs.axes is None:
            return call
        axes = [int(a) for a in call.attrs.axes]
        pad = self._bound(call.args[0])
        if not (isinstance(pad, relax.Call) and pad.op == _PAD and pad.attrs.pad_mode == "constant"):
            return call
        widths = [int(w) for w in pad.attrs.pad_width]
        if len(widths) != 2 * len(axes):
            return call
        moved = [w for axis in axes for w in widths[2 * axis:2 * axis + 2]]
        inner = self._permuted(pad.args[0], axes)
        return relax.op.nn.pad(inner, moved, pad_value=float(pad.attrs.pad_value))

    def _permuted(self, expr, axes: list[int]):
        """``permute_dims(expr, axes)``, or what ``expr`` transposed if this undoes that."""
        source = self._bound(expr)
        if isinstance(source, relax.Call) and source.op == _PERMUTE and source.attrs.axes is not None:
            before = [int(a) for a in source.attrs.axes]
            if [before[a] for a in axes] == list(range(len(axes))):
                return source.args[0]
        return self.builder_.emit(relax.op.permute_dims(expr, axes))

    def _bound(self, expr):
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if value is not None:
                return value
        return expr
