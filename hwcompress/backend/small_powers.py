"""``pow`` by a small whole constant on CPUs as multiplications, not a libm call per lane.

TVM lowers ``pow`` to LLVM's ``llvm.pow``, which LLVM (without fast-math's reassociation) turns
into one ``powf`` call per vector lane even for ``x^3``: the tanh form of GELU (``x + 0.044715 x^3``
inside), as GPT-2-style and ``approximate="tanh"`` exports write it, ran its dense layer's epilogue
at 7x the conv's own time (a block of two dense layers: 3.4x ONNX Runtime's). Here a float32 power
by 2, 3 or 4 is that many multiplications (``x^2`` exactly what ``powf`` gives, ``x^3`` and ``x^4``
within an ulp or two); other exponents keep TVM's lowering.
"""

from __future__ import annotations

import tvm
from tvm import tirx

SMALL_EXPONENTS = (2, 3, 4)

_ORIGINAL = {}


def install() -> None:
    """Make every later LLVM build lower float32 powers by small whole constants this way (once
    per process)."""
    if "pow" in _ORIGINAL:
        return
    _ORIGINAL["pow"] = tvm.ir.Op.get("tirx.pow").get_attr("llvm.FLowerIntrinsic")
    tvm.ir.register_op_attr("tirx.pow", "llvm.FLowerIntrinsic", _lower_pow, level=99)


def constant_exponent(expr) -> float | None:
    """The value of a float constant (or a vector of one), else None."""
    if isinstance(expr, tirx.Broadcast):
        expr = expr.value
    return float(expr.value) if isinstance(expr, tirx.FloatImm) else None


def _lower_pow(call):
    x, exponent = call.args
    value = constant_exponent(exponent)
    if not str(x.ty).startswith("float32") or value not in SMALL_EXPONENTS:
        return _ORIGINAL["pow"](call)
    result = x
    for _ in range(int(value) - 1):
        result = result * x
    return result
