"""What the project's Relax rewrites (dense_as_conv, layout_transposes, channel_padding, int8_lowering,
affine_chain, depthwise_pointwise, concat_in_place) share: running a mutator over every Relax
function of a module, or a rewrite over each binding block of the fused kernels' calls, and
reading a constant (a weight through the bindings and transposes the importer and the layout
conversion put in front of it)."""

from __future__ import annotations

from typing import Callable

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


def rewrite_blocks(mod: tvm.IRModule, rewrite: Callable) -> tvm.IRModule:
    """``mod`` with each binding block of its Relax functions (not the primitive ones fusion made)
    replaced by ``rewrite(builder, block, uses)`` (``uses``: how often each variable of the
    function is read; the builder: where new kernels go), unused bindings removed."""
    builder = relax.BlockBuilder(mod)
    changed = False
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function) or (func.attrs is not None and "Primitive" in func.attrs):
            continue
        uses = variable_uses(func)
        blocks = [rewrite(builder, block, uses) for block in func.body.blocks]
        if any(new is not old for new, old in zip(blocks, func.body.blocks)):
            changed = True
            builder.update_func(gvar, relax.Function(func.params, relax.SeqExpr(blocks, func.body.body),
                                                     func.ret_ty, func.is_pure, func.attrs))
    return relax.transform.DeadCodeElimination()(builder.get()) if changed else mod


def variable_uses(func: relax.Function) -> dict:
    """How often each variable of ``func`` is read."""
    uses: dict = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, count)
    return uses


def is_call_tir(expr) -> bool:
    """Whether ``expr`` calls a kernel (``call_tir``, not in place)."""
    return isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"


def constant_value(expr) -> np.ndarray | None:
    """The value of ``expr`` where it is a constant (a quantization scale, a bias, a bound), else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def scalar_value(expr) -> float | None:
    """The value of ``expr`` where it is a one-element constant (a scale, an epsilon), else None."""
    value = constant_value(expr)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def unit_step_slice(call) -> tuple[list[int], list[int], list[int]] | None:
    """(axes, begins, ends) of ``call`` where it is a ``strided_slice`` whose steps are all 1, else None."""
    def ints(arg):
        fields = getattr(arg, "fields", None)
        values = [f.value for f in fields] if fields is not None else getattr(arg, "values", None)
        return None if values is None else [int(v) for v in values]

    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.strided_slice":
        return None
    axes, begins, ends = (ints(call.args[i]) for i in (1, 2, 3))
    strides = ints(call.args[4]) if len(call.args) > 4 else None
    if axes is None or begins is None or ends is None or any(s != 1 for s in strides or []):
        return None
    return axes, begins, ends


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


def dense_conv_weight(mutator: relax.PyExprMutator, call) -> np.ndarray | None:
    """The constant weights of ``call`` where it is a dense (one group) NHWC/HWIO conv, else None:
    the convs the output padding and Winograd rewrite."""
    if call.op != tvm.ir.Op.get("relax.nn.conv2d") or int(call.attrs.groups) != 1 \
            or call.attrs.data_layout != "NHWC" or call.attrs.kernel_layout != "HWIO" \
            or call.attrs.out_layout != "NHWC":
        return None
    return bound_constant(mutator, call.args[1])
