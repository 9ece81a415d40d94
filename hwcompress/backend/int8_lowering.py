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

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .affine_chain import affine_chain, shared_vars
from .dense_as_conv import matmul_as_conv
from .relax_rewrite import constant_value

_CONV = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
DOT_GROUP = 4  # input channels one integer dot-product lane sums (x86 vpdpbusd, Arm sdot)


def _as_zero_point_free_int8(weight: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray | None:
    """``weight - zero`` as int8 where it fits (uint8 weights around 128, int8 ones with a small
    zero point: exact), else None."""
    if weight.dtype not in (np.int8, np.uint8):
        return None
    if not np.any(zero):
        return weight if weight.dtype == np.int8 else (weight.astype(np.int8) if weight.max() < 128 else None)
    if zero.size > 1:
        shape = [1] * weight.ndim
        shape[axis] = zero.size
        zero = zero.reshape(shape)
    shifted = weight.astype(np.int16) - zero.astype(np.int16)
    if shifted.min() < -128 or shifted.max() > 127:
        return None
    return shifted.astype(np.int8)


def _padded(x_q, padding: list[int], zero_point: int, extra_channels: int):
    """(data, conv padding): the border must hold the input's zero point. Where that is 0 (any
    ReLU/ReLU6 output quantized to uint8: every depthwise input of MobileNetV2) the conv pads by
    itself, inside its kernel; else an explicit pad, a kernel of its own that writes a padded copy."""
    if not extra_channels and (zero_point == 0 or not any(padding)):
        return x_q, padding
    return relax.op.nn.pad(x_q, [0, 0, 0, extra_channels, padding[0], padding[2], padding[1], padding[3]],
                           pad_value=float(zero_point)), [0, 0, 0, 0]


@mutator
class _LowerQDQ(PyExprMutator):
    def __init__(self, mod, activations: str):
        super().__init__(mod)
        self.activations = activations
        self.lowered: list[str] = []
        self.kept_float: list[str] = []

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
        values = [constant_value(e) for e in (s_x, z_x, s_w, z_w)]
        w_int = constant_value(w_q)
        kind = "conv2d" if call.op == _CONV else "matmul"
        if any(v is None for v in values) or w_int is None:
            return self._kept(call, kind, "its weights or quantization parameters are not constant")
        s_x, z_x, s_w, z_w = values
        if s_x.size != 1 or z_x.size != 1 or z_x.dtype not in (np.int8, np.uint8):
            return self._kept(call, f"{kind} {w_int.shape}", "its input is not per-tensor 8-bit")
        w_int = _as_zero_point_free_int8(w_int, z_w, w_axis)
        if w_int is None:
            return self._kept(call, f"{kind} {constant_value(w_q).shape}",
                              "its weights minus their zero point do not fit int8")
        w_q = relax.const(w_int)
        z_x = int(z_x.reshape(()))
        grouped = call.op == _CONV and int(call.attrs.groups) != 1  # reads either byte type
        if x_q.ty.dtype != self.activations and not grouped:
            # The dot product wants the other byte type (x86's vpdpbusd: unsigned activations; Arm's
            # sdot and smull: signed): x -/+ 128 (a bit flip, fused into the producer's epilogue)
            # with the zero point moved by the same 128.
            shift = 128 if self.activations == "uint8" else -128
            x_q = relax.op.astype(relax.op.add(relax.op.astype(x_q, "int16"), relax.const(np.int16(shift))),
                                  self.activations)
            z_x += shift
        if call.op == _CONV:
            return self._conv(call, x_q, float(s_x.reshape(())), z_x, w_q, w_int, s_w, w_axis)
        return self._matmul(call, x_q, float(s_x.reshape(())), z_x, w_q, w_int, s_w, w_axis)

    def _kept(self, call, what: str, why: str):
        self.kept_float.append(f"{what}: {why}; runs in float")
        return call

    def _conv(self, call, x_q, s_x, z_x, w_q, w_int, s_w, w_axis):
        attrs = call.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or w_axis != 0:
            return self._kept(call, f"conv2d {w_int.shape}", "its layout or weight scale axis is not NCHW/OIHW, axis 0")
        if attrs.groups != 1:
            return self._grouped(call, x_q, s_x, z_x, w_int, s_w)
        padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
        # Input channels padded to a multiple of the dot product's group of 4 (an RGB input's 3):
        # the new channels hold the zero point and meet zero weights, so the sums are unchanged.
        extra = -w_int.shape[1] % DOT_GROUP
        data, inner = _padded(x_q, padding, z_x, extra)
        if extra:
            w_q = relax.const(np.pad(w_int, [(0, 0), (0, extra), (0, 0), (0, 0)]))
        acc = relax.op.nn.conv2d(data, w_q, strides=attrs.strides, padding=inner, dilation=attrs.dilation,
                                 groups=1, out_dtype="int32")
        channels = w_int.shape[0]
        correction = z_x * w_int.astype(np.int64).reshape(channels, -1).sum(1)
        scale = (s_x * np.broadcast_to(s_w.reshape(-1), (channels,))).astype(np.float32)
        self.lowered.append(f"conv2d {w_int.shape}")
        return self._rescale(acc, correction.reshape(1, channels, 1, 1), scale.reshape(1, channels, 1, 1))

    def _grouped(self, call, x_q, s_x, z_x, w_int, s_w):
        """A grouped conv (depthwise: one input channel per group) reads the 8-bit activations
        itself and multiplies in float: ``conv(x_q, W_q * s_w * s_x) - z_x * sum(W_q * s_w * s_x)``
        per output channel. Nine products per output (depthwise) leave nothing for a dot product to
        sum; what pays is that the tensors around it stay 8-bit (as a separate dequantize it was
        fused into the producer, which then wrote floats: 4x the memory traffic)."""
        attrs = call.attrs
        channels, groups = w_int.shape[0], int(attrs.groups)
        weight = (w_int.astype(np.float32) * (s_x * np.broadcast_to(s_w.reshape(-1), (channels,)))
                  .astype(np.float32).reshape(-1, 1, 1, 1)).astype(np.float32)
        data, inner = _padded(x_q, [int(p) for p in attrs.padding], z_x, 0)
        out = relax.op.nn.conv2d(data, relax.const(weight), strides=attrs.strides, padding=inner,
                                 dilation=attrs.dilation, groups=groups, out_dtype="float32")
        kind = "depthwise" if groups == channels and w_int.shape[1] == 1 else f"grouped ({groups} groups)"
        self.lowered.append(f"{kind} conv2d {w_int.shape}")
        correction = (z_x * weight.reshape(channels, -1).astype(np.float64).sum(1)).astype(np.float32)
        if not np.any(correction):
            return out
        return relax.op.subtract(out, relax.const(correction.reshape(1, channels, 1, 1)))

    def _matmul(self, call, x_q, s_x, z_x, w_q, w_int, s_w, w_axis):
        if w_int.ndim != 2 or w_axis not in (1, -1):
            return self._kept(call, f"matmul {w_int.shape}", "its weights are not 2-D with per-column scales")
        columns = w_int.shape[1]
        # As a 1x1 conv, a fully connected layer gets the conv's dot-product kernel.
        acc = matmul_as_conv(x_q, w_int, "int32", pad_value=float(z_x), depth_multiple=DOT_GROUP)
        if acc is None:
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


_QUANTIZE = tvm.ir.Op.get("relax.quantize")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_MAXIMUM = tvm.ir.Op.get("relax.maximum")
_MINIMUM = tvm.ir.Op.get("relax.minimum")


@mutator
class _ElementwiseQDQ(PyExprMutator):
    """Per-tensor quantize/dequantize with constant parameters spelled as the elementwise ops they
    are (TVM's own legalization, step for step but for the division: ``x * (1 / s)``, round half
    to even, ``+ z``, clip, cast). Relax's layout conversion knows no layout for ``quantize``, so it wrapped each one in a
    pair of NHWC <-> NCHW transposes (MobileNetV2 int8: 0.4 ms each); elementwise ops follow the
    convolutions into NHWC and fuse into their epilogues."""

    def __init__(self, mod, shared: frozenset):
        super().__init__(mod)
        self.shared = shared  # variables other ops read too: the requantize folding stops there

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op not in (_QUANTIZE, _DEQUANTIZE):
            return call
        scale, zero = constant_value(call.args[1]), constant_value(call.args[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            return call
        scale_value = np.float32(scale.reshape(()))
        scale = relax.const(scale_value)
        data, out_dtype = call.args[0], str(call.attrs.out_dtype)
        if call.op == _DEQUANTIZE:
            if out_dtype != "float32" or data.ty.dtype not in ("int8", "uint8", "int32"):
                return call
            shifted = relax.op.subtract(relax.op.astype(data, "int32"), relax.const(np.int32(zero.reshape(()))))
            return relax.op.multiply(relax.op.astype(shifted, "float32"), scale)
        if out_dtype not in ("int8", "uint8") or data.ty.dtype != "float32":
            return call
        info = np.iinfo(out_dtype)
        # x * (1 / s), not x / s: a vector division costs ten multiplies, in every epilogue. The two
        # differ by at most one unit in the last place, so a value lands on another step only when
        # x / s is within that of a rounding tie (ONNX Runtime's int8 kernels multiply too).
        inverse_value = np.float32(1.0 / np.float64(scale_value))
        zero_value = np.float32(zero.reshape(()))
        # Folding stops where another op reads the value too (a ReLU output that also feeds a float
        # residual): else the conv's output would feed two chains and leave its kernel unfused.
        foldable = data not in self.shared
        data, low, high = self._without_clamps(data)

        def quantized(y: float) -> float:  # the kernel's own arithmetic, on one value
            return float(np.clip(np.round(np.float32(y) * inverse_value) + zero_value, info.min, info.max))

        low = max(float(info.min), quantized(low)) if low is not None else float(info.min)
        high = min(float(info.max), quantized(high)) if high is not None else float(info.max)
        chain = affine_chain(data, self.lookup_binding, self.shared) if foldable else None
        if chain is not None:  # the requantize arithmetic in front, folded with this 1/s and + z
            rounded = relax.op.round(chain.scaled(float(inverse_value), float(zero_value)).emit())
        else:
            rounded = relax.op.add(relax.op.round(relax.op.multiply(data, relax.const(inverse_value))),
                                   relax.const(zero_value))
        # maximum/minimum, not clip: clip has no layout rule either.
        clipped = relax.op.minimum(relax.op.maximum(rounded, relax.const(np.float32(low))),
                                   relax.const(np.float32(high)))
        # float -> int32 -> uint8 (vcvttps2dq, vpmovdb): x86 has no float -> byte conversion.
        return relax.op.astype(relax.op.astype(clipped, "int32"), out_dtype)

    def _without_clamps(self, data):
        """``data`` without the ReLU / ReLU6 / Clip in front of the quantize, and its bounds.

        Quantizing is monotone, so quantize(clip(y, a, b)) = clamp(quantize(y), quantize(a),
        quantize(b)) exactly: the clamp the quantize does anyway takes the activation's bounds and
        the float max/min go (two instructions per vector in every conv epilogue)."""
        original, low, high = data, None, None
        while True:
            value = self.lookup_binding(data) if isinstance(data, relax.Var) else data
            if low is not None and high is not None and low > high:
                return original, None, None  # a clamp to a constant: left as written
            if not isinstance(value, relax.Call):
                return data, low, high
            if value.op == _RELU:
                low = 0.0 if low is None else max(low, 0.0)
                data = value.args[0]
                continue
            bound = constant_value(value.args[1]) if value.op in (_MAXIMUM, _MINIMUM) and len(value.args) == 2 else None
            if bound is None or bound.size != 1 or not np.issubdtype(bound.dtype, np.floating):
                return data, low, high
            bound = float(bound.reshape(()))
            if value.op == _MAXIMUM:
                low = bound if low is None else max(low, bound)
            else:
                high = bound if high is None else min(high, bound)
            data = value.args[0]


@dataclass
class Int8Lowering:
    """What the lowering did: the layers now integer compute, and those left in float and why."""

    lowered: list[str]
    kept_float: list[str]
    instructions: str = ""  # what the target's int8 kernels run on (set by the build)


def lower_qdq(mod: tvm.IRModule, activations: str = "uint8") -> tuple[tvm.IRModule, Int8Lowering]:
    """``mod`` with every matching QDQ Conv/MatMul as int8 x int8 -> int32 compute, and the
    remaining per-tensor quantize/dequantize as elementwise ops. ``activations``: the byte type
    (``uint8`` or ``int8``) the target's dot product multiplies the int8 weights by."""
    if activations not in ("uint8", "int8"):
        raise ValueError(f"activations must be uint8 or int8, not {activations!r}")
    lowering = _LowerQDQ(mod, activations)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gvar] = lowering.visit_expr(func)
    # Biases reshaped to (1, C, 1, 1) become constants, so the requantize chains fold (affine_chain).
    mod = relax.transform.FoldConstant()(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gvar] = _ElementwiseQDQ(mod, shared_vars(func)).visit_expr(func)
    mod = relax.transform.DeadCodeElimination()(mod)
    return mod, Int8Lowering(lowering.lowered, lowering.kept_float)
