"""Rewrite a 2-D transposed convolution into a convolution to ``Co*sh*sw`` channels followed by a
pixel shuffle (and a crop where the transposed conv is padded): the sub-pixel form of Shi et al.
2016 ("Is the deconvolution layer the same as a convolutional layer?").

With stride ``s`` an output row ``Y' = Y + pad = s*q + r`` (phase ``r`` in ``[0, s)``) is reached
from input rows ``q - m`` through kernel row ``s*m + r`` only, for ``m`` in ``[0, ceil(k/s))``:
``y[o, s*q+r] = sum_{c,m} x[c, q-m] * W[c, o, s*m+r] + B[o]``. Per phase that is an ordinary
correlation with a ``ceil(k/s)``-tap kernel (the taps flipped, the input zero-padded), so one conv
to ``Co*sh*sw`` channels computes every phase; a Reshape -> Transpose -> Reshape moves the phases
into space, and a Slice drops the rows and columns the padding removes. Exact, and the same
multiply-adds as the transposed conv (the 2x2 stride-2 upsampling of U-Nets is a 1x1 conv). TVM
lowers ConvTranspose as a convolution over a zero-dilated input (``sh*sw`` times the work, no
NHWC form, no schedule): a 4x4 stride-2 layer ran 74x slower than ONNX Runtime; as a conv it gets
the project's register-blocked schedule.
"""

from __future__ import annotations

import numpy as np

from ..model.graph import Graph
from .base import PassLog, model_pass


@model_pass
def convtranspose_as_conv(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type != "ConvTranspose":
            continue
        why = _not_applicable(graph, node)
        if why:
            log.skipped.append(f"{node.name}: {why}")
            continue
        done = _rewrite(graph, node)
        if done is None:
            log.skipped.append(f"{node.name}: output_padding reaches past what the phases compute")
        else:
            log.applied.append(f"{node.name}: {done}")


def _rewrite(graph: Graph, node) -> str | None:
    """Replace ``node`` by its conv + pixel shuffle (+ crop) and say what it became; None,
    changing nothing, where the output reaches past the phases' rows."""
    weight = graph.initializer(node.input[1])
    attrs = graph.attrs(node)
    groups = attrs.get("group", 1)
    cin, group_out, kh, kw = weight.shape
    cout = group_out * groups
    n, _, h, w = graph.shape(node.input[0])
    strides = tuple(attrs.get("strides", [1, 1]))
    pads = list(attrs.get("pads", [0] * 4))
    extra = list(attrs.get("output_padding", [0, 0]))
    # Per spatial axis: taps per phase, the conv's own padding, the phase rows it computes
    # [first, last) and where the output starts in the shuffled rows.
    taps, conv_pads, rows, crop = [], [0] * 4, [], []
    for axis, (size, k, s) in enumerate(zip((h, w), (kh, kw), strides)):
        K = -(-k // s)
        out = (size - 1) * s + k - pads[axis] - pads[axis + 2] + extra[axis]
        first, last = pads[axis] // s, -(-(pads[axis] + out) // s)
        before = K - 1 - first
        after = last - first - (size + before - K + 1)
        if before < 0 or after < 0:  # a pad wider than the kernel: compute every phase row, crop more
            first, before, after = 0, K - 1, K - 1
            last = size + K - 1
        taps.append(K)
        conv_pads[axis], conv_pads[axis + 2] = before, after
        rows.append(last - first)
        crop.append((pads[axis] - first * s, pads[axis] - first * s + out))
        if crop[-1][1] > rows[-1] * s:
            return None
    (Kh, Kw), (sh, sw) = taps, strides
    padded = np.zeros((cin, group_out, Kh * sh, Kw * sw), weight.dtype)
    padded[:, :, :kh, :kw] = weight
    # Per group g: kernel[g, o, rh, rw, c, th, tw] = W[g*cin/groups + c, o, sh*(Kh-1-th) + rh, sw*(Kw-1-tw) + rw]
    kernel = padded.reshape(groups, cin // groups, group_out, Kh, sh, Kw, sw)[:, :, :, ::-1, :, ::-1, :]
    kernel = kernel.transpose(0, 2, 4, 6, 1, 3, 5).reshape(cout * sh * sw, cin // groups, Kh, Kw)
    inputs = [node.input[0], graph.add_initializer(f"{node.name}_Wphases", np.ascontiguousarray(kernel))]
    if len(node.input) > 2 and node.input[2]:
        bias = np.repeat(graph.initializer(node.input[2]), sh * sw)
        inputs.append(graph.add_initializer(f"{node.name}_Bphases", bias.astype(weight.dtype)))
    conv, grouped, moved, shuffled = (graph.unique_name(f"{node.name}_{s}")
                                      for s in ("phases", "groups", "moved", "shuffled"))
    shape = lambda dims: graph.add_initializer(f"{node.name}_shape", np.array(dims, np.int64))  # noqa: E731
    full = [rows[0] * sh, rows[1] * sw]
    cropped = [b - a for a, b in crop] != full
    nodes = [graph.make_node("Conv", inputs, [conv], name=f"{node.name}_phases", kernel_shape=[Kh, Kw],
                             pads=conv_pads, group=groups),
             graph.make_node("Reshape", [conv, shape([n, cout, sh, sw, *rows])], [grouped], name=f"{node.name}_groups"),
             graph.make_node("Transpose", [grouped], [moved], name=f"{node.name}_shuffle", perm=[0, 1, 4, 2, 5, 3]),
             graph.make_node("Reshape", [moved, shape([n, cout, *full])],
                             [shuffled if cropped else node.output[0]], name=f"{node.name}_space")]
    if cropped:
        nodes.append(graph.make_node("Slice", [shuffled, shape([crop[0][0], crop[1][0]]),
                                               shape([crop[0][1], crop[1][1]]), shape([2, 3])],
                                     [node.output[0]], name=node.name))
    graph.replace_node(node, nodes)
    return (f"ConvTranspose {kh}x{kw} stride {sh}x{sw} is a {Kh}x{Kw} conv to {cout * sh * sw} channels, "
            "a pixel shuffle" + (" and a crop" if cropped else ""))


def _not_applicable(graph: Graph, node) -> str | None:
    if not graph.is_constant(node.input[1]) or (len(node.input) > 2 and node.input[2]
                                                 and not graph.is_constant(node.input[2])):
        return "weights are not constant"
    weight = graph.initializer(node.input[1])
    shape = graph.shape(node.input[0])
    if weight.ndim != 4 or not shape or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return "not a 2-D transposed convolution with a static input shape"
    attrs = graph.attrs(node)
    if any(d != 1 for d in attrs.get("dilations", [1, 1])) or "output_shape" in attrs \
            or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "dilated, or shaped by output_shape/auto_pad (only explicit pads are rewritten)"
    return None
