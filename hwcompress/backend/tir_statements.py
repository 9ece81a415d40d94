"""One walk over the statements of a lowered TIR function, for passes of the ``hwc_cpu`` pipeline
that change a few statements and keep the rest (``stack_buffers``, ``small_kernels``)."""

from __future__ import annotations

from tvm.tirx import stmt as S


def rebuild(node, change):
    """``node`` with ``change`` applied to every statement, children first: ``change(stmt)``
    returns the statement to use (``stmt`` itself where nothing changes). Rebuilt only along the
    paths that change. In this IR allocations and bindings are flat statements; only these five
    kinds hold others."""
    if isinstance(node, S.SeqStmt):
        seq = [rebuild(s, change) for s in node.seq]
        if any(a is not b for a, b in zip(seq, node.seq)):
            node = S.SeqStmt(seq)
    elif isinstance(node, S.For):
        body = rebuild(node.body, change)
        if body is not node.body:
            node = S.For(node.loop_var, node.min, node.extent, node.kind, body, node.thread_binding,
                         node.annotations, node.step)
    elif isinstance(node, S.AttrStmt):
        body = rebuild(node.body, change)
        if body is not node.body:
            node = S.AttrStmt(node.node, node.attr_key, node.value, body)
    elif isinstance(node, S.IfThenElse):
        then_case = rebuild(node.then_case, change)
        else_case = rebuild(node.else_case, change) if node.else_case is not None else None
        if then_case is not node.then_case or else_case is not node.else_case:
            node = S.IfThenElse(node.condition, then_case, else_case)
    elif isinstance(node, S.While):
        body = rebuild(node.body, change)
        if body is not node.body:
            node = S.While(node.condition, body)
    return change(node)
