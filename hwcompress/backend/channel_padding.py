"""Pad a conv's output channels up to a multiple of the CPU's vector tile, then slice them off.

A register-blocked conv (``cpu_schedules``) needs the output channels to be a multiple of the
vector lanes; 1000 classes (SqueezeNet's last conv) fall to 8-lane vectors and one vector per
tile on AVX-512, twice as slow as ONNX Runtime, which pads its own blocked layout the same way.
The padding is done on the constant weights at compile time (zero filters), and the slice back
to the real channel count is fused into the conv's epilogue, so the padded channels are computed
in registers and never stored.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .relax_rewrite import bound_constant, rewrite_functions

# Layers with this many vectors are padded to whole register tiles; smaller ones only to whole
# vectors, and only where that adds at most MAX_SMALL_WASTE of work (3 -> 16 channels would cost
# more than the wider vectors win; 85 -> 96, a YOLO head left to a generic kernel, cost a quarter of
# the model's time).
MIN_VECTORS = 8
MAX_SMALL_WASTE = 0.25
INT8_MIN_LANES = 8


def pad_output_channels(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every dense float or int8 NHWC/HWIO conv with constant weights whose output channels are not a
    multiple of ``lanes`` computes zero-padded channels (up to a multiple of two vectors, the
    register tile's best width, for wide layers; of one vector for narrow ones where that wastes
    little) and slices them off. Multiples of ``lanes`` (144 on 16 lanes) are tiled as they are."""
    return rewrite_functions(_PadOutChannels(mod, lanes), mod)


@relax.expr_functor.mutator
class _PadOutChannels(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != tvm.ir.Op.get("relax.nn.conv2d") or int(call.attrs.groups) != 1 \
                or call.attrs.data_layout != "NHWC" or call.attrs.kernel_layout != "HWIO" \
                or call.attrs.out_layout != "NHWC":
            return call
        weight = bound_constant(self, call.args[1])
        if weight is None or weight.dtype not in (np.float32, np.int8):
            return call
        channels = weight.shape[3]
        if channels % self.lanes == 0:
            return call
        if weight.dtype == np.int8 and channels < MIN_VECTORS * self.lanes:
            # The int8 kernel has 16- and 8-lane forms and nothing narrower: any other count (a
            # classifier's 10 classes) would run as a scalar loop.
            extra = -channels % INT8_MIN_LANES
        elif channels >= MIN_VECTORS * self.lanes:
            extra = -channels % (2 * self.lanes)
        elif channels % 4 and -channels % self.lanes <= channels * MAX_SMALL_WASTE:
            # No vector of 4 or more lanes divides it (a detector head's 85 channels): 96, 13% more work.
            extra = -channels % self.lanes
        else:
            return call
        if not extra:
            return call
        padded = np.pad(weight, [(0, 0)] * 3 + [(0, extra)])
        conv = self.builder_.emit(relax.Call(call.op, [call.args[0], relax.const(padded)], call.attrs))
        return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[channels])
