"""A tensor read through the reshapes, transposes, slices and squeezes that made it from another.

Attention splits its projections into heads with a reshape, a transpose and (timm's exports) a
slice and a squeeze; each such chain was a kernel writing a reordered copy that the next kernel
read once. A ``View`` is the chain as an index map, from the view's indices to the source's, so
that a hand-written kernel (``batch_matmul``) reads the source where the view's element lies and
the copy is never made.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from tvm import relax

from .dense_as_conv import static_shape
from .relax_rewrite import unit_step_slice

MAX_STEPS = 8  # layout ops read through, at most

_RESHAPES = ("relax.reshape", "relax.squeeze", "relax.expand_dims")


@dataclass(frozen=True)
class View:
    """A tensor of ``shape`` whose element at an index lies in a tensor of ``source_shape``:
    ``steps``, from the view towards the source, each ``("permute", axes)`` (the view is that
    ``permute_dims`` of the next tensor), ``("reshape", shape, next_shape)`` or ``("offset",
    begins)`` (a slice: the next tensor's index is the view's plus ``begins``)."""

    shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    steps: tuple = ()

    @staticmethod
    def of(shape) -> "View":
        """A tensor read as it is."""
        return View(tuple(shape), tuple(shape))

    def reshaped(self, shape) -> "View":
        """This view seen in ``shape`` (the same elements in the same order)."""
        shape = tuple(shape)
        if shape == self.shape:
            return self
        return View(shape, self.source_shape, (("reshape", shape, self.shape),) + self.steps)

    def permuted(self, axes) -> "View":
        """``permute_dims`` of this view."""
        axes = tuple(axes)
        return View(tuple(self.shape[a] for a in axes), self.source_shape, (("permute", axes),) + self.steps)

    def source_index(self, index: list) -> list:
        """The source's index of the view's element at ``index`` (ints or TIR expressions)."""
        for step in self.steps:
            if step[0] == "permute":
                moved = [None] * len(index)
                for position, axis in enumerate(step[1]):
                    moved[axis] = index[position]
                index = moved
            elif step[0] == "reshape":
                index = _reshaped_index(step[1], step[2], index)
            else:
                index = [i + b if b else i for i, b in zip(index, step[1])]
        return index

    def contiguous(self, axis: int) -> bool:
        """Whether the elements along ``axis`` lie side by side in the source, everywhere in the
        view (checked at its corners), so that whole vectors of them can be loaded as they are."""
        corners = itertools.product(*[(0, size - 1) if t != axis else (0,) for t, size in enumerate(self.shape)])
        for corner in corners:
            first = self._offset(list(corner))
            for step in range(1, self.shape[axis]):
                index = list(corner)
                index[axis] = step
                if self._offset(index) != first + step:
                    return False
        return True

    def _offset(self, index: list) -> int:
        flat = 0
        for i, size in zip(self.source_index(index), self.source_shape):
            flat = flat * size + i
        return flat


def _reshaped_index(shape, next_shape, index: list) -> list:
    """The index in ``next_shape`` of the element at ``index`` in the same elements seen in
    ``shape``: axes grouped where their sizes' products meet, each group flattened and split again
    (axes of size 1 skipped; a group of one axis on both sides passes its index through)."""
    out = [t for t, size in enumerate(shape) if size != 1]
    into = [d for d, size in enumerate(next_shape) if size != 1]
    result = [0] * len(next_shape)
    p = q = 0
    while p < len(out) and q < len(into):
        first_p, first_q = p, q
        have, need = shape[out[p]], next_shape[into[q]]
        p, q = p + 1, q + 1
        while have != need:
            if have < need:
                have, p = have * shape[out[p]], p + 1
            else:
                need, q = need * next_shape[into[q]], q + 1
        group, parts = out[first_p:p], into[first_q:q]
        if len(group) == 1 and len(parts) == 1:
            result[parts[0]] = index[group[0]]
            continue
        flat = 0
        for t in group:
            flat = flat * shape[t] + index[t]
        below = need
        for position, d in enumerate(parts):
            below //= next_shape[d]
            value = flat // below if below > 1 else flat
            result[d] = value % next_shape[d] if position else value
    return result


def read_through(mutator: relax.PyExprMutator, expr) -> tuple:
    """(the tensor ``expr`` was made from by layout ops, the ``View`` of it that ``expr`` is):
    ``expr`` itself where no such op made it. Read through: reshapes, squeezes, expand_dims,
    permute_dims and unit-step slices of float32 tensors with static shapes."""
    shape = static_shape(expr)
    view = View.of(shape)
    for _ in range(MAX_STEPS):
        bound = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(bound, relax.Call) or not bound.args:
            break
        source, op = bound.args[0], getattr(bound.op, "name", "")
        inner = static_shape(source)
        if inner is None or getattr(source.ty, "dtype", None) != "float32":
            break
        if op in _RESHAPES:
            step = ("reshape", tuple(static_shape(expr)), tuple(inner))
        elif op == "relax.permute_dims":
            axes = range(len(inner))[::-1] if bound.attrs.axes is None else bound.attrs.axes
            step = ("permute", tuple(int(a) for a in axes))
        elif op == "relax.strided_slice":
            begins = _slice_begins(bound, len(inner))
            if begins is None:
                break
            step = ("offset", begins)
        else:
            break
        view = View(view.shape, tuple(inner), view.steps + (step,))
        expr = source
    return expr, view


def _slice_begins(call, rank: int) -> tuple[int, ...] | None:
    """Each axis's first index taken by a ``strided_slice`` of unit steps; None where a step is not 1."""
    found = unit_step_slice(call)
    if found is None:
        return None
    axes, begins, _ = found
    shape = static_shape(call.args[0])
    result = [0] * rank
    for axis, begin in zip(axes, begins):
        result[axis % rank] = begin + shape[axis % rank] if begin < 0 else begin
    return tuple(result)
