"""The index maps that let a kernel read a tensor through the layout ops that made it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hwcompress.backend.tensor_views import View


def _chain(source_shape, steps):
    """(the view ``steps`` make of a numbered source, as numpy computes it; its ``View``), ``steps``
    given from the source outwards as numpy-like ops."""
    tensor = np.arange(int(np.prod(source_shape))).reshape(source_shape)
    view = View.of(source_shape)
    for kind, arg in steps:
        if kind == "reshape":
            tensor, view = tensor.reshape(arg), view.reshaped(arg)
        elif kind == "permute":
            tensor, view = tensor.transpose(arg), view.permuted(arg)
        else:  # a slice along axis 0 from ``arg`` to its end
            tensor = tensor[arg:]
            view = View(tensor.shape, view.source_shape, (("offset", (arg,) + (0,) * (tensor.ndim - 1)),) + view.steps)
    return tensor, view


@pytest.mark.parametrize("source_shape, steps", [
    # timm's qkv split: [1, 197, 576] -> [1, 197, 3, 3, 64] -> [3, 1, 3, 197, 64] -> k, v (a slice) ->
    # squeezed; then K^T
    ([1, 12, 24], [("reshape", [1, 12, 3, 2, 4]), ("permute", [2, 0, 3, 1, 4]), ("slice", 1),
                   ("reshape", [2, 2, 12, 4]), ("permute", [0, 1, 3, 2])]),
    # windows x heads flattened into one batch axis, then K^T as the kernel sees it
    ([4, 7, 6], [("reshape", [4, 7, 3, 2]), ("permute", [0, 2, 1, 3]), ("reshape", [12, 7, 2]), ("permute", [0, 2, 1])]),
    # axes merged and split at once, axes of size 1 added and dropped
    ([6, 4, 1, 5], [("reshape", [3, 1, 8, 5]), ("reshape", [24, 5, 1]), ("permute", [2, 1, 0])]),
])
def test_a_view_finds_every_element_where_the_layout_ops_put_it(source_shape, steps):
    """Each element of the view, looked up through its index map, is the source element numpy's
    reshapes, transposes and slices put there."""
    tensor, view = _chain(source_shape, steps)
    assert view.shape == tensor.shape and view.source_shape == tuple(source_shape)
    source = np.arange(int(np.prod(source_shape))).reshape(source_shape)
    for index in itertools.product(*map(range, tensor.shape)):
        assert source[tuple(view.source_index(list(index)))] == tensor[index], index


def test_a_view_tells_where_its_rows_lie_side_by_side_in_its_source():
    """The kernel loads a right-hand side's rows as whole vectors where they lie side by side in
    the tensor read, else packs them first: a head's slice of a projection's rows is contiguous,
    a transposed matrix's rows are not."""
    _, heads = _chain([4, 7, 6], [("reshape", [4, 7, 3, 2]), ("permute", [0, 2, 1, 3]), ("reshape", [12, 7, 2])])
    assert heads.contiguous(2) and not heads.contiguous(1)
    _, transposed = _chain([2, 5, 3], [("permute", [0, 2, 1])])
    assert not transposed.contiguous(2) and transposed.contiguous(1)
