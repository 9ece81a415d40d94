"""What the project's Relax rewrites (dense_as_conv, pad_layout, channel_padding, int8_lowering,
affine_chain) share: running a mutator over every Relax function of a module, and reading a
constant (a weight through the bindings and transposes the importer and the layout conversion put
in front of it)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def rewrite_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function visited by ``mutator``, unused bindings removed."""
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def constant_value(expr) -> np.ndarray | None:
    """The value of ``expr`` where it is a constant (a quantization scale, a bias, a bound), else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def bound_constant(mutator: relax.PyExprMutator, expr) -> np.ndarray | None:
    """The value of ``expr`` where it is a constant, a variable bound to one, or a transpose of one
    (Gemm's ``transB``; weights ConvertLayout moved to HWIO); else None."""
    if isinstance(expr, relax.Var) and mutator.lookup_binding(expr) is not None:
        expr = mutator.lookup_binding(expr)
    if isinstance(expr, tvm.ir.expr.Constant):
        return constant_value(expr)
    if isinstance(expr, relax.Call) and expr.op == _PERMUTE and isinstance(expr.args[0], tvm.ir.expr.Constant):
        axes = [int(a) for a in expr.attrs.axes] if expr.attrs.axes is not None else None
        return np.transpose(expr.args[0].value.numpy(), axes)
    return None
