"""ONNX -> TVM Relax, with some of the importer's conversions replaced.

TVM 0.27's importer emits Clip, HardSwish, HardSigmoid and LeakyRelu as ops that layout conversion
cannot see through (``clip`` and ``leakyrelu`` lower to opaque kernels), so in an NHWC model each sat
between two transposes, outside the conv's kernel; and it imports Max/Min of several inputs as a
``stack`` and a reduction, which layout conversion cannot handle at all ("Invalid SLayout"). Here
they are written with the broadcasting binary ops (``maximum``, ``minimum``, ``multiply``, ``add``)
that layout conversion moves to NHWC and the conv schedule fuses into its epilogue. Pad becomes
Relax's ``nn.pad``, which the layout rewrites move to the NHWC side of the transposes.

TVM imports no recurrent op (LSTM, GRU, RNN): on CPUs each becomes a MatMul and a loop kernel
(``recurrent_loops``); elsewhere the layer is unrolled first (``passes.unroll_recurrent``).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import onnx

from ..config.vector_unit import VectorUnit
from ..errors import HwcError, first_line
from ..model.recurrent import RECURRENT_OPS


# The converters are swapped in TVM's module for the time of one import: one import at a time.
_IMPORTING = threading.Lock()


def import_onnx(model: onnx.ModelProto, unit: VectorUnit | None = None):
    """The Relax module of an ONNX model, weights bound as constants; recurrent layers as loop
    kernels for a CPU with vector ``unit``, unrolled where there is none (GPU targets)."""
    from tvm.relax.frontend.onnx import from_onnx

    if unit is None and any(n.op_type in RECURRENT_OPS for n in model.graph.node):
        from ..passes import unroll_recurrent

        model = unroll_recurrent(onnx.shape_inference.infer_shapes(model))  # it needs the input's shape
    try:
        with _IMPORTING, _converters_replaced(), _recurrent_loops(unit):
            return from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # the importer raises many types for unsupported constructs
        raise HwcError(f"TVM cannot import the model: {type(exc).__name__}: {first_line(exc)}") from exc


def _const(value: float, dtype: str):
    from tvm import relax

    return relax.const(value, dtype)


def _input(bb, inputs) -> tuple:
    """The first input and its dtype (float32 where the importer has not typed it yet)."""
    x = inputs[0]
    try:
        dtype = str(bb.normalize(x).ty.dtype)
    except (AttributeError, RuntimeError):
        dtype = "float32"
    return x, dtype


def _bounded(x, low, high, dtype: str):
    """x clamped to [low, high] (either may be None: unbounded), as maximum/minimum."""
    from tvm import relax

    if low is not None:
        x = relax.op.maximum(x, _const(low, dtype))
    if high is not None:
        x = relax.op.minimum(x, _const(high, dtype))
    return x


def _clip(original):
    """Clip with constant bounds; other bounds keep the importer's own conversion."""
    def convert(cls, bb, inputs, attr, params):
        import tvm

        bounds = inputs[1:3] + [None] * (3 - len(inputs))
        if not all(b is None or isinstance(b, tvm.ir.expr.Constant) and b.value.numpy().size == 1 for b in bounds):
            return original.__func__(cls, bb, inputs, attr, params)
        low, high = (None if b is None or np.isnan(b.value.numpy()).any() else float(b.value.numpy())
                     for b in bounds)  # NaN: unbounded, as in ONNX Runtime
        x, dtype = _input(bb, inputs)
        return _bounded(x, low, high, dtype)
    return convert


def _hard_swish(_original):
    def convert(cls, bb, inputs, attr, params):
        from tvm import relax

        x, dtype = _input(bb, inputs)
        gate = _bounded(relax.op.add(x, _const(3.0, dtype)), 0.0, 6.0, dtype)
        return relax.op.multiply(x, relax.op.multiply(gate, _const(1.0 / 6.0, dtype)))
    return convert


def _hard_sigmoid(_original):
    def convert(cls, bb, inputs, attr, params):
        from tvm import relax

        x, dtype = _input(bb, inputs)
        alpha, beta = float(attr.get("alpha", 0.2)), float(attr.get("beta", 0.5))
        return _bounded(relax.op.add(relax.op.multiply(x, _const(alpha, dtype)), _const(beta, dtype)), 0.0, 1.0, dtype)
    return convert


def _leaky_relu(original):
    def convert(cls, bb, inputs, attr, params):
        from tvm import relax

        alpha = float(attr.get("alpha", 0.01))
        if not 0.0 <= alpha <= 1.0:  # max(x, alpha * x) holds only for slopes in [0, 1]
            return original.__func__(cls, bb, inputs, attr, params)
        x, dtype = _input(bb, inputs)
        return relax.op.maximum(x, relax.op.multiply(x, _const(alpha, dtype)))
    return convert


def _elementwise_extreme(op_name):
    def factory(_original):
        def convert(cls, bb, inputs, attr, params):
            from tvm import relax

            op = getattr(relax.op, op_name)
            result = inputs[0]
            for other in inputs[1:]:  # ONNX Max/Min broadcast like the binary ops
                result = op(result, other)
            return result
        return convert
    return factory


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(original):
    """Pad as Relax's ``nn.pad`` (the importer emits a TE kernel that layout conversion cannot see
    through: a reflect-padded conv's input was padded in NCHW inside the layout transpose's kernel,
    0.35 ms for 32x128x128, most of the conv's time again). Pads given as attributes (opset 2),
    negative pads (crops) and modes Relax lacks keep the importer's conversion."""
    def convert(cls, bb, inputs, attr, params):
        from tvm import relax

        mode = _PAD_MODES.get(attr.get("mode", b"constant").decode("utf-8"))
        if len(inputs) < 2 or inputs[1] is None or mode is None:
            return original.__func__(cls, bb, inputs, attr, params)
        try:
            before, after, value = cls._parse_pads_and_axes(inputs, params)
        except ValueError:
            return original.__func__(cls, bb, inputs, attr, params)
        if min(before + after) < 0:
            return original.__func__(cls, bb, inputs, attr, params)
        widths = [int(w) for pair in zip(before, after) for w in pair]
        return relax.op.nn.pad(inputs[0], widths, pad_mode=mode, pad_value=float(value))
    return convert


# ONNX op -> a factory of its converter (given the importer's own, for the cases it keeps).
_CONVERTERS = {"Clip": _clip, "HardSwish": _hard_swish, "HardSigmoid": _hard_sigmoid, "LeakyRelu": _leaky_relu,
               "Max": _elementwise_extreme("maximum"), "Min": _elementwise_extreme("minimum"), "Pad": _pad}


@contextlib.contextmanager
def _converters_replaced():
    from tvm.relax.frontend.onnx import onnx_frontend

    saved = []
    for op, factory in _CONVERTERS.items():
        cls = getattr(onnx_frontend, op)
        for name in [a for a in dir(cls) if a.startswith("_impl_v")]:
            original = getattr(cls, name)
            saved.append((cls, name, cls.__dict__.get(name)))
            setattr(cls, name, classmethod(factory(original)))
    try:
        yield
    finally:
        for cls, name, value in saved:
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)


@contextlib.contextmanager
def _recurrent_loops(unit: VectorUnit | None):
    """The importer's op table with LSTM, GRU and RNN as loop kernels for ``unit`` (None: as it is)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from .recurrent_loops import converter

    if unit is None:
        yield
        return
    original = onnx_frontend._get_convert_map
    added = {kind: type(kind, (onnx_frontend.OnnxOpConverter,), {"_impl_v1": classmethod(converter(kind, unit))})
             for kind in RECURRENT_OPS}
    onnx_frontend._get_convert_map = lambda: {**original(), **added}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
