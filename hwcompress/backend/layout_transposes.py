"""Pads and channel shuffles moved to the NHWC side of the layout conversion's transposes.

Relax's ``ConvertLayout`` has no NHWC rule for ``nn.pad`` or for a reshape, so what it cannot
convert stays in NCHW, wrapped in a transpose to NCHW before it and one back after it.

- Pads: the int8 lowering pads explicitly (with the input's zero point, which the conv's own zero
  padding cannot express), so every padded int8 conv moved its input through memory three times.
  ``permute_dims(pad(x), to_nhwc)`` becomes ``pad(permute_dims(x, to_nhwc))`` with the pad widths
  permuted the same way.
- Channel shuffles: ShuffleNet's, written for NCHW (``Reshape [N, g, C/g, H, W]``, ``Transpose``
  of the two channel axes, ``Reshape [N, C, H, W]``, then a ``Split`` of the channels), had every
  unit transposed to NCHW and each half back for the convs reading it: the ShuffleNet-style model
  spent about a quarter of its per-kernel profile moving data between layouts. The shuffle of a
  tensor transposed to NCHW becomes the same permutation of the NHWC channels
  (``[N, H, W, g, C/g]``, the last two axes swapped), with the transpose to NCHW after it; a split
  of a transposed tensor splits before the transpose, a concat of tensors transposed alike
  concatenates before it.

A transpose of a transpose is one transpose, or none where the second undoes the first, so the
transposes moved this way meet and cancel; a transpose that keeps every axis in place (what the
conversion leaves where a model's own transpose to NHWC follows its transpose to NCHW, as at the
output of a model written channels-last) is none.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .relax_rewrite import rewrite_functions

_PAD = tvm.ir.Op.get("relax.nn.pad")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_SPLIT = tvm.ir.Op.get("relax.split")
_CONCAT = tvm.ir.Op.get("relax.concat")
_TO_NCHW = [0, 3, 1, 2]


def nhwc_side(mod: tvm.IRModule) -> tvm.IRModule:
    return rewrite_functions(_Mover(mod), mod)


def _shape(expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    try:
        return [int(d) for d in shape] if shape is not None else None
    except (TypeError, ValueError):  # a dynamic dimension
        return None


@relax.expr_functor.mutator
class _Mover(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        rewritten = None
        if call.op == _RESHAPE:
            rewritten = self._shuffle(call)
        elif call.op == _SPLIT:
            rewritten = self._split(call)
        elif call.op == _CONCAT:
            rewritten = self._concat(call)
        elif call.op == _PERMUTE and call.attrs.axes is not None:
            axes = [int(a) for a in call.attrs.axes]
            if axes == list(range(len(axes))):  # what ConvertLayout leaves of an NHWC model's own transposes
                return call.args[0]
            rewritten = self._permuted(call.args[0], axes)
            if rewritten is None:
                rewritten = self._pad_permuted(call.args[0], axes)
            if rewritten is None:
                rewritten = self._repeat_permuted(call.args[0], axes)
        return call if rewritten is None else rewritten

    def _pad_permuted(self, expr, axes: list[int]):
        """``permute_dims(pad(x), axes)`` as ``pad(permute_dims(x, axes))``, the widths permuted
        (every mode pads each axis on its own: constant, reflect, replicate, circular)."""
        pad = self._bound(expr)
        if not (isinstance(pad, relax.Call) and pad.op == _PAD):
            return None
        widths = [int(w) for w in pad.attrs.pad_width]
        if len(widths) != 2 * len(axes):
            return None
        moved = [w for axis in axes for w in widths[2 * axis:2 * axis + 2]]
        inner = self._permuted(pad.args[0], axes)
        if inner is None:
            inner = relax.op.permute_dims(pad.args[0], axes)
        return relax.op.nn.pad(self.builder_.emit(inner), moved, pad_mode=str(pad.attrs.pad_mode),
                               pad_value=float(pad.attrs.pad_value))

    def _repeat_permuted(self, expr, axes: list[int]):
        """``permute_dims(concat([x, x, ...], axis), axes)`` (a tensor repeated along an axis, as
        ``channel_multiplier_as_depthwise`` repeats a depthwise conv's input) as the repeat of
        ``permute_dims(x, axes)``: one transpose (by tiles) and whole-vector copies, not a kernel
        gathering every output vector across the input's channels (56x56x64 repeated 4 times into
        NHWC: 1.7 ms on AMD Zen 5)."""
        concat = self._bound(expr)
        if not (isinstance(concat, relax.Call) and concat.op == _CONCAT and concat.attrs.axis is not None):
            return None
        parts = self._bound(concat.args[0])
        if not isinstance(parts, relax.Tuple) or len(parts.fields) < 2 \
                or not all(f.same_as(parts.fields[0]) for f in parts.fields[1:]):
            return None
        moved = self.builder_.emit(relax.op.permute_dims(parts.fields[0], axes))
        return relax.op.concat([moved] * len(parts.fields), axes.index(int(concat.attrs.axis)))

    def _shuffle(self, call):
        """``reshape(permute(reshape(permute(x, to NCHW), [N, g, C/g, H, W]), [0, 2, 1, 3, 4]),
        [N, C, H, W])`` as the NHWC shuffle of ``x``, transposed to NCHW after it."""
        swap = self._bound(call.args[0])
        if not self._is_permute(swap, [0, 2, 1, 3, 4]):
            return None
        split = self._bound(swap.args[0])
        if not (isinstance(split, relax.Call) and split.op == _RESHAPE):
            return None
        nchw = self._bound(split.args[0])
        if not self._is_permute(nchw, _TO_NCHW):
            return None
        x = nchw.args[0]
        shape, groups, out = _shape(x), _shape(split), _shape(call)
        if shape is None or groups is None or out is None or len(groups) != 5:
            return None
        n, h, w, c = shape
        if groups[0] != n or groups[1] * groups[2] != c or groups[3:] != [h, w] or out != [n, c, h, w]:
            return None
        grouped = self.builder_.emit(relax.op.reshape(x, [n, h, w, groups[1], groups[2]]))
        swapped = self.builder_.emit(relax.op.permute_dims(grouped, [0, 1, 2, 4, 3]))
        shuffled = self.builder_.emit(relax.op.reshape(swapped, [n, h, w, c]))
        return relax.op.permute_dims(shuffled, _TO_NCHW)

    def _split(self, call):
        """``split(permute(x, axes), axis)`` as each part of ``split(x, axes[axis])`` permuted."""
        source = self._bound(call.args[0])
        if not (self._is_permute(source) and isinstance(call.ty, relax.TupleType)):
            return None
        axes = [int(a) for a in source.attrs.axes]
        sections = call.attrs.indices_or_sections
        sections = int(sections) if isinstance(sections, (int, tvm.tirx.IntImm)) else [int(i) for i in sections]
        parts = self.builder_.emit(relax.op.split(source.args[0], sections, axes[int(call.attrs.axis)]))
        count = len(call.ty.fields)
        return relax.Tuple([self.builder_.emit(relax.op.permute_dims(relax.TupleGetItem(parts, i), axes))
                            for i in range(count)])

    def _concat(self, call):
        """``concat(permute(a, axes), permute(b, axes), ..., axis)`` as
        ``permute(concat(a, b, ..., axes[axis]), axes)``."""
        tensors = self._bound(call.args[0])
        if not isinstance(tensors, relax.Tuple) or call.attrs.axis is None:
            return None
        sources = [self._bound(t) for t in tensors.fields]
        if not all(self._is_permute(s) for s in sources):
            return None
        axes = [int(a) for a in sources[0].attrs.axes]
        if any([int(a) for a in s.attrs.axes] != axes for s in sources[1:]):
            return None
        joined = self.builder_.emit(relax.op.concat([s.args[0] for s in sources], axes[int(call.attrs.axis)]))
        return relax.op.permute_dims(joined, axes)

    def _permuted(self, expr, axes: list[int]):
        """``permute_dims(expr, axes)`` where ``expr`` is itself a transpose: the two as one, or the
        tensor before both where they cancel; None where ``expr`` is no transpose."""
        source = self._bound(expr)
        if not self._is_permute(source):
            return None
        before = [int(a) for a in source.attrs.axes]
        combined = [before[a] for a in axes]
        if combined == list(range(len(axes))):
            return source.args[0]
        return relax.op.permute_dims(source.args[0], combined)

    def _is_permute(self, expr, axes: list[int] | None = None) -> bool:
        return (isinstance(expr, relax.Call) and expr.op == _PERMUTE and expr.attrs.axes is not None
                and (axes is None or [int(a) for a in expr.attrs.axes] == axes))

    def _bound(self, expr):
        """What ``expr`` is bound to, looking through a tuple element of a tuple built here."""
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if value is not None:
                expr = value
        if isinstance(expr, relax.TupleGetItem):
            tup = self._bound(expr.tuple_value)
            if isinstance(tup, relax.Tuple):
                return self._bound(tup.fields[expr.index])
        return expr
