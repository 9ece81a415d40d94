"""ONNX -> TVM Relax, with the importer's conversions that this project needs done otherwise."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx

from ..errors import HwcError, first_line


def import_onnx(model: onnx.ModelProto):
    """The Relax module of an ONNX model, weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with _clip_as_relax_ops():
            return from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # the importer raises many types for unsupported constructs
        raise HwcError(f"TVM cannot import the model: {type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager
def _clip_as_relax_ops():
    """Import Clip with constant bounds as Relax ``maximum``/``minimum`` ops.

    TVM 0.27's importer emits every Clip as opaque ``call_tir`` kernels; layout conversion cannot
    see through them, so each ReLU6 of an NHWC MobileNetV2 sat between two transposes (a fifth of
    its run time). Bounds that are not constants keep the importer's own conversion."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend.Clip._impl_v13

    def clip(cls, bb, inputs, attr, params):
        bounds = inputs[1:3] + [None] * (3 - len(inputs))
        if not all(b is None or isinstance(b, tvm.ir.expr.Constant) and b.value.numpy().size == 1 for b in bounds):
            return original.__func__(cls, bb, inputs, attr, params)
        result = inputs[0]
        for bound, op in zip(bounds, (relax.op.maximum, relax.op.minimum)):
            if bound is not None and not np.isnan(bound.value.numpy()).any():  # NaN: unbounded, as in ORT
                result = bb.emit(op(result, relax.const(bound.value.numpy().reshape(()), bound.value.dtype)))
        return result

    onnx_frontend.Clip._impl_v13 = classmethod(clip)
    try:
        yield
    finally:
        onnx_frontend.Clip._impl_v13 = original
