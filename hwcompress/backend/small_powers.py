"""A power by a small whole constant as multiplications, not a libm call per vector lane.

TVM lowers ``power`` to LLVM's ``llvm.pow``, which LLVM (without fast-math's reassociation) turns
into one ``powf`` call per vector lane even for ``x^3`` (and TVM prints a warning for every such
power): the tanh form of GELU (``x + 0.044715 x^3`` inside), as GPT-2-style and
``approximate="tanh"`` exports write it, ran its dense layer's epilogue at 7x the conv's own time
(a block of two dense layers: 3.4x ONNX Runtime's). Here a float32 power by 2, 3 or 4 becomes that
many multiplications before lowering (``x^2`` exactly what ``powf`` gives, ``x^3`` and ``x^4``
within an ulp or two); other exponents stay powers.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .dense_as_conv import static_shape
from .relax_rewrite import rewrite_functions, scalar_value

SMALL_EXPONENTS = (2.0, 3.0, 4.0)


def multiply_small_powers(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every float32 power by a constant 2, 3 or 4 written as multiplications."""
    return rewrite_functions(_SmallPowers(mod), mod)


@relax.expr_functor.mutator
class _SmallPowers(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if getattr(call.op, "name", "") != "relax.power" or getattr(call.ty, "dtype", None) != "float32":
            return call
        base, exponent = call.args
        value = scalar_value(exponent)
        if value not in SMALL_EXPONENTS or static_shape(base) is None or static_shape(base) != static_shape(call):
            return call  # (an exponent broadcasting the base to more axes stays a power)
        result = base
        for _ in range(int(value) - 1):
            result = relax.op.multiply(result, base)
        return result
