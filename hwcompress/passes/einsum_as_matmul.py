"""An Einsum of two tensors as the batched MatMul it is: each operand transposed to (batch,
kept, summed) order and reshaped to three axes, one MatMul, the result reshaped and transposed to
the equation's output. Attention written with ``torch.einsum`` (``bihd,bjhd->bhij``) exports so.

TVM imports an Einsum as one generic kernel, a naive loop nest without a schedule: such an
attention block ran 4.1x ONNX Runtime's time. As a MatMul it gets the batched-matmul kernel (which
reads through the transposes and reshapes). The same products summed in the MatMul's order:
within float32 rounding of ONNX Runtime's Einsum.

Left alone: other than two operands, ellipses, a label repeated within one operand (a diagonal)
or summed within one operand only, broadcast sizes, shapes not static.
"""

from __future__ import annotations

import math

import numpy as np

from ..model.graph import Graph
from .base import PassLog, model_pass


def _parse(equation: str) -> tuple[str, str, str] | None:
    """(first operand's labels, second's, output's), or None where this pass does not apply."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    a, b = operands
    if any(len(set(labels)) != len(labels) for labels in (a, b, out)):
        return None
    if any(label not in a + b for label in out) or any(label not in out and (label not in a or label not in b)
                                                      for label in a + b):
        return None
    return a, b, out


@model_pass
def einsum_as_matmul(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx"):
            continue
        if graph.dtype(node.input[0]) not in (np.float32, np.float16):
            log.skipped.append(f"{node.name}: not a float product")
            continue
        equation = graph.attr(node, "equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else equation
        labels = _parse(equation) if len(node.input) == 2 else None
        shapes = [graph.shape(name) for name in node.input]
        if labels is None or any(s is None or not all(isinstance(d, int) for d in s) for s in shapes) \
                or any(len(s) != len(ls) for s, ls in zip(shapes, labels[:2])):
            log.skipped.append(f"{node.name}: {equation!r} is not a product of two static tensors")
            continue
        a, b, out = labels
        size = {}
        for operand, shape in zip((a, b), shapes):
            for label, extent in zip(operand, shape):
                size.setdefault(label, extent)
        if any(size[label] != extent for operand, shape in zip((a, b), shapes) for label, extent in zip(operand, shape)):
            log.skipped.append(f"{node.name}: {equation!r} broadcasts an axis")
            continue
        batch = [x for x in out if x in a and x in b]
        kept_a, kept_b = [x for x in out if x in a and x not in b], [x for x in out if x in b and x not in a]
        summed = [x for x in a if x in b and x not in out]

        def extent(group):
            return math.prod(size[x] for x in group)

        nodes = []

        def arranged(tensor: str, operand: str, order: list[str], dims: list[int], hint: str) -> str:
            perm = [operand.index(x) for x in order]
            if perm != list(range(len(perm))):
                moved = graph.unique_name(f"{hint}_t")
                nodes.append(graph.make_node("Transpose", [tensor], [moved], name=moved, perm=perm))
                tensor = moved
            shaped = graph.unique_name(f"{hint}_r")
            nodes.append(graph.make_node("Reshape", [tensor, graph.add_initializer("shape", np.array(dims, np.int64))],
                                         [shaped], name=shaped))
            return shaped

        left = arranged(node.input[0], a, batch + kept_a + summed, [extent(batch), extent(kept_a), extent(summed)],
                        f"{node.name}_a")
        right = arranged(node.input[1], b, batch + summed + kept_b, [extent(batch), extent(summed), extent(kept_b)],
                         f"{node.name}_b")
        product = graph.unique_name(f"{node.name}_matmul")
        nodes.append(graph.make_node("MatMul", [left, right], [product], name=product))
        result_order = batch + kept_a + kept_b
        perm = [result_order.index(x) for x in out]
        unflat = node.output[0] if perm == list(range(len(perm))) else graph.unique_name(f"{node.name}_unflat")
        nodes.append(graph.make_node("Reshape", [product, graph.add_initializer(
            "shape", np.array([size[x] for x in result_order], np.int64))], [unflat], name=f"{node.name}_unflat"))
        if unflat != node.output[0]:
            nodes.append(graph.make_node("Transpose", [unflat], [node.output[0]], name=f"{node.name}_out", perm=perm))
        graph.replace_node(node, nodes)
        log.applied.append(f"{node.name}: {equation} as a MatMul of [{extent(batch)}, {extent(kept_a)}, "
                           f"{extent(summed)}] by [{extent(batch)}, {extent(summed)}, {extent(kept_b)}]")
