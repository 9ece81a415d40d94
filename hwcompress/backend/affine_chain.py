"""The float arithmetic in front of a quantize, folded into one multiply-add per input.

Between an int8 layer's int32 accumulators and the next quantize, the lowered graph spells the
requantization step by step: subtract the zero-point correction, convert, multiply by the per-channel
scale, add the bias, (add a residual: convert, subtract its zero point, multiply by its scale),
multiply by 1/s of the quantize, round, add its zero point. All of it is affine with constant
coefficients, so it is ``sum_i(convert(x_i) * a_i) + b`` with ``a_i`` and ``b`` folded at compile
time: in the conv kernel's epilogue that is one convert and one fused multiply-add per input
instead of 7-8 vector instructions. (Float rounding moves a value to the next step only where the
step-by-step value sat within an ulp of a rounding tie: within the one step the tests allow.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .relax_rewrite import constant_value

_ADD = tvm.ir.Op.get("relax.add")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_ASTYPE = tvm.ir.Op.get("relax.astype")


@dataclass
class Affine:
    """``sum(convert(leaf) * coefficient) + offset``; leaves are integer tensors (converted to
    float32) or float tensors (taken as they are)."""

    terms: list[tuple[relax.Expr, np.ndarray]]
    offset: np.ndarray
    steps: int  # ops the chain had; folded, they and the quantize's own two ops become at most one per term

    def scaled(self, factor: float, shift: float) -> "Affine":
        return Affine([(leaf, c * factor) for leaf, c in self.terms], self.offset * factor + shift, self.steps)

    def emit(self) -> relax.Expr:
        """The folded expression: per leaf a convert and a multiply, one add per further leaf and one
        for the offset (multiply-adds once LLVM contracts them)."""
        out = None
        for leaf, coefficient in self.terms:
            value = leaf if leaf.ty.dtype == "float32" else relax.op.astype(leaf, "float32")
            term = value if np.all(coefficient == 1) else relax.op.multiply(value, _const(coefficient))
            out = term if out is None else relax.op.add(out, term)
        return out if not np.any(self.offset) else relax.op.add(out, _const(self.offset))


def affine_chain(expr: relax.Expr, lookup, shared: frozenset = frozenset(), max_depth: int = 12) -> Affine | None:
    """``expr`` (float32) as an ``Affine`` over the bindings ``lookup`` resolves, or None where it
    has no such form or nothing to fold. Variables in ``shared`` (read by other ops too) are leaves:
    folding through them would compute the chain twice and split the conv from its epilogue."""

    def resolve(var):
        return None if var in shared else lookup(var)

    result = _float(expr, resolve, max_depth)
    if result is None or result.steps == 0:  # a bare input: nothing to fold into the quantize's own multiply-add
        return None
    return result


def _float(expr, lookup, depth: int) -> Affine | None:
    value = lookup(expr) if isinstance(expr, relax.Var) else expr
    leaf = Affine([(expr, np.ones((), np.float64))], np.zeros((), np.float64), 0)
    if depth <= 0 or not isinstance(value, relax.Call) or getattr(expr.ty, "dtype", None) != "float32":
        return leaf
    op, args = value.op, value.args
    if op == _ASTYPE and args[0].ty.dtype in ("int32", "int16", "uint8", "int8"):
        inner = _integer(args[0], lookup, depth - 1)
        return Affine([(inner[0], np.ones((), np.float64))], inner[1].astype(np.float64), inner[2] + 1)
    if op in (_ADD, _SUBTRACT):
        sign = 1.0 if op == _ADD else -1.0
        left, right = _float(args[0], lookup, depth - 1), constant_value(args[1])
        if right is not None:
            return Affine(left.terms, left.offset + sign * right, left.steps + 1)
        right = _float(args[1], lookup, depth - 1)
        return Affine(left.terms + [(leaf, sign * c) for leaf, c in right.terms], left.offset + sign * right.offset,
                      left.steps + right.steps + 1)
    if op == _MULTIPLY:
        for data, factor in ((args[0], args[1]), (args[1], args[0])):
            constant = constant_value(factor)
            if constant is not None:
                inner = _float(data, lookup, depth - 1)
                return Affine([(leaf, c * constant) for leaf, c in inner.terms], inner.offset * constant,
                              inner.steps + 1)
    return leaf


def _integer(expr, lookup, depth: int) -> tuple[relax.Expr, np.ndarray, int]:
    """An integer tensor as ``(leaf, offset, steps)``: ``expr = leaf + offset`` (constants
    subtracted or added, widening casts looked through)."""
    value = lookup(expr) if isinstance(expr, relax.Var) else expr
    if depth <= 0 or not isinstance(value, relax.Call):
        return expr, np.zeros((), np.int64), 0
    if value.op in (_ADD, _SUBTRACT):
        constant = constant_value(value.args[1])
        if constant is not None and np.issubdtype(constant.dtype, np.integer):
            leaf, offset, steps = _integer(value.args[0], lookup, depth - 1)
            sign = 1 if value.op == _ADD else -1
            return leaf, offset + sign * constant.astype(np.int64), steps + 1
    if value.op == _ASTYPE and str(value.args[0].ty.dtype) in ("uint8", "int8", "int16") \
            and str(expr.ty.dtype) in ("int16", "int32"):
        leaf, offset, steps = _integer(value.args[0], lookup, depth - 1)
        return leaf, offset, steps + 1
    return expr, np.zeros((), np.int64), 0


def _const(values: np.ndarray) -> relax.Constant:
    return relax.const(np.asarray(values, np.float32))


def shared_vars(func: relax.Function) -> frozenset:
    """The variables of ``func`` that more than one binding (or the result) reads."""
    counts: dict = {}

    def count(expr):
        for var in relax.analysis.free_vars(expr):
            counts[var] = counts.get(var, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            count(binding.value)
    count(func.body.body)
    return frozenset(var for var, n in counts.items() if n > 1)
