"""Run QDQ layers as integer compute in TVM Relax.

TVM's ONNX importer turns DequantizeLinear into float arithmetic, so a QDQ model compiled as is
multiplies floats (and first converts every int8 weight back to float). This Relax rewrite finds

    conv2d(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0))     (and the same for matmul)

with constant per-channel int8 weights and a per-tensor uint8/int8 activation, and replaces it by

    acc = conv2d(pad(x_q, value=z_x), W_q, out_dtype=int32)          (u)int8 x int8 -> int32
    y   = float(acc - z_x * sum(W_q)) * (s_x * s_w)                    per output channel

which is exactly the QDQ layer's value up to float rounding of the final scale: the padding holds
the quantized zero, and the zero-point correction is a per-channel constant folded at compile time.
What follows (bias, activation, the next QuantizeLinear) stays as it was. Whether the result is
faster than fp32 depends on the CPU's integer dot-product support; the search measures it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_CONV = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")


def _constant(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


@mutator
class _LowerQDQ(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.lowered: list[str] = []

    def _dequantized(self, expr):
        """(q, scale, zero) if ``expr`` is bound to a dequantize call, else None."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Call) and value.op == _DEQUANTIZE:
            return value.args[0], value.args[1], value.args[2], int(value.attrs.axis)
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op not in (_CONV, _MATMUL):
            return call
        data, weight = self._dequantized(call.args[0]), self._dequantized(call.args[1])
        if data is None or weight is None:
            return call
        x_q, s_x, z_x, _ = data
        w_q, s_w, z_w, w_axis = weight
        values = [_constant(e) for e in (s_x, z_x, s_w, z_w)]
        w_int = _constant(w_q)
        if any(v is None for v in values) or w_int is None or w_int.dtype != np.int8:
            return call
        s_x, z_x, s_w, z_w = values
        if s_x.size != 1 or z_x.size != 1 or np.any(z_w != 0) or z_x.dtype not in (np.int8, np.uint8):
            return call
        if call.op == _CONV:
            return self._conv(call, x_q, float(s_x.reshape(())), int(z_x.reshape(())), w_q, w_int, s_w, w_axis)
        return self._matmul(call, x_q, float(s_x.reshape(())), int(z_x.reshape(())), w_q, w_int, s_w, w_axis)

    def _conv(self, call, x_q, s_x, z_x, w_q, w_int, s_w, w_axis):
        attrs = call.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or w_axis != 0 or attrs.groups != 1:
            return call
        padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
        data = x_q
        if any(padding):
            data = relax.op.nn.pad(x_q, [0, 0, 0, 0, padding[0], padding[2], padding[1], padding[3]],
                                   pad_value=float(z_x))
        acc = relax.op.nn.conv2d(data, w_q, strides=attrs.strides, padding=(0, 0), dilation=attrs.dilation,
                                 groups=1, out_dtype="int32")
        channels = w_int.shape[0]
        correction = z_x * w_int.astype(np.int64).reshape(channels, -1).sum(1)
        scale = (s_x * np.broadcast_to(s_w.reshape(-1), (channels,))).astype(np.float32)
        self.lowered.append(f"conv2d {w_int.shape}")
        return self._rescale(acc, correction.reshape(1, channels, 1, 1), scale.reshape(1, channels, 1, 1))

    def _matmul(self, call, x_q, s_x, z_x, w_q, w_int, s_w, w_axis):
        if w_int.ndim != 2 or w_axis not in (1, -1):
            return call
        columns = w_int.shape[1]
        acc = relax.op.matmul(x_q, w_q, out_dtype="int32")
        correction = z_x * w_int.astype(np.int64).sum(0)
        scale = (s_x * np.broadcast_to(s_w.reshape(-1), (columns,))).astype(np.float32)
        self.lowered.append(f"matmul {w_int.shape}")
        return self._rescale(acc, correction, scale)

    @staticmethod
    def _rescale(acc, correction: np.ndarray, scale: np.ndarray):
        if np.any(correction):
            acc = relax.op.subtract(acc, relax.const(correction.astype(np.int32)))
        return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale))


def lower_qdq(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[str]]:
    """``mod`` with every matching QDQ Conv/MatMul as int8 x int8 -> int32 compute; the layers lowered."""
    mutator_ = _LowerQDQ(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gvar] = mutator_.visit_expr(func)
    mod = relax.transform.DeadCodeElimination()(mod)
    return mod, mutator_.lowered
