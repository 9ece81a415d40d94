"""Pad a conv's output channels up to a multiple of the CPU's vector tile, or its output width up
to one a good register tile divides, then slice them off.

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

from ..config.vector_unit import VectorUnit, widest_lanes
from .dense_as_conv import type_shape
from .relax_rewrite import dense_conv_weight, rewrite_functions

# Layers with this many vectors are padded to whole register tiles; smaller ones to one whole vector
# where that pays (``narrow_padding_pays``), always where no vector of 4 or more lanes divides their
# channels, however much work the zero channels add: the alternative is a generic loop. Measured untuned on AMD Zen 4 (AVX-512, 2 threads), padded /
# unpadded: 32->3 3x3 at 224x224 0.18, 32->9 3x3 at 112x112 0.05, 16->2 1x1 at 224x224 0.71, a YOLO
# head's 85 -> 96; a super-resolution net ending in 32->9 and DepthToSpace 71.8 -> 13.7 ms (ONNX
# Runtime 15-17 ms). Padded 12, 24 and 40 read 0.95-1.0 there.
MIN_VECTORS = 8
INT8_MIN_LANES = 8


def narrow_padding_pays(channels: int, lanes: int) -> bool:
    """Whether a narrow layer takes fewer vector operations on whole ``lanes``-wide vectors over
    channels padded to a multiple of them than on the widest narrower vector dividing its channels
    (none: a generic loop): every count but one narrower vector (4 or 8 channels on 16 lanes).
    ShuffleNetV2's 116 channels ran on 4-lane vectors: 128 on 16 lanes is 8 operations per pixel
    where 29 were; the ShuffleNet-style example ran 1.47x faster (AMD Zen 5, 2 threads). Padding 24
    or 40 channels (8-lane vectors) to 32 or 48 takes 2 operations for 3, 3 for 5: on Zen 4, which
    splits a 512-bit operation in two, that is 4 for 3 and 6 for 5, and yet padded 12, 24, 40
    measured 0.95-1.0x there; on Zen 5 (full-rate 512-bit, as Intel's AVX-512 cores) the MobileNetV3-
    and ShuffleNet-style examples ran 0.92 and 0.84-0.95x the time they took unpadded, MobileNetV2
    0.97x (the two libraries alternating, 40 rounds)."""
    narrower = widest_lanes(channels, lanes)
    if not narrower:
        return True  # a detector head's 85 channels, an RGB output's 3
    return -(-channels // lanes) < channels / narrower


def pad_output_channels(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every dense float or int8 NHWC/HWIO conv with constant weights whose output channels are not a
    multiple of ``lanes`` computes zero-padded channels (up to a multiple of two vectors, the
    register tile's best width, for wide layers; of one vector for narrow ones where that pays,
    ``narrow_padding_pays``) and slices them off. Multiples of ``lanes`` (144 on 16 lanes) are
    tiled as they are."""
    return rewrite_functions(_PadOutChannels(mod, lanes), mod)


@relax.expr_functor.mutator
class _PadOutChannels(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        weight = dense_conv_weight(self, call)
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
        elif narrow_padding_pays(channels, self.lanes):
            extra = -channels % self.lanes
        else:
            return call
        if not extra:
            return call
        padded = np.pad(weight, [(0, 0)] * 3 + [(0, extra)])
        conv = self.builder_.emit(relax.Call(call.op, [call.args[0], relax.const(padded)], call.attrs))
        return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[channels])


# Output columns a conv may compute beyond its width, to be sliced off, for a better register tile.
MAX_WIDTH_PADDING = 3


def width_padding(out_width: int, channels: int, unit: VectorUnit) -> int:
    """Columns to add to a conv's output where no register tile divides its width (37, or a keyword
    spotter's 101 frames: a generic loop) and a few more columns have one: at most
    ``MAX_WIDTH_PADDING`` (8 % more work at 37). Two 1x1 convs at 37x37x128 ran 1.25 ms, 0.32
    computing 38 columns (AMD Zen 5, 2 threads). Widths with a tile of one channel vector (17, 19)
    stay: 18 or 20 columns on two vectors measured 0.90-1.03x (a 1x7 + 7x1 block at 17x17 and
    19x19, 1x1 convs at 17x17 and 19x19, the YOLO-style example at 608x608: 1.00)."""
    from .cpu_schedules import choose_tiles

    if choose_tiles(out_width, channels, unit) is not None:
        return 0
    for extra in range(1, MAX_WIDTH_PADDING + 1):
        if choose_tiles(out_width + extra, channels, unit) is not None:
            return extra
    return 0


def pad_output_width(mod: tvm.IRModule, unit: VectorUnit) -> tvm.IRModule:
    """Every dense float NHWC/HWIO conv with constant weights whose output width has no register
    tile (``width_padding``) computes that many more columns (zero padding on the right of its
    input) and slices them off in its epilogue."""
    return rewrite_functions(_PadOutWidth(mod, unit), mod)


@relax.expr_functor.mutator
class _PadOutWidth(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, unit: VectorUnit):
        super().__init__(mod)
        self.unit = unit

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        weight = dense_conv_weight(self, call)
        shape = type_shape(call.ty)
        if weight is None or weight.dtype != np.float32 or shape is None:
            return call
        extra = width_padding(shape[2], shape[3], self.unit)
        if not extra:
            return call
        attrs = call.attrs
        top, left, bottom, right = (int(p) for p in attrs.padding)
        conv = self.builder_.emit(relax.op.nn.conv2d(
            call.args[0], call.args[1], strides=[int(s) for s in attrs.strides],
            padding=[top, left, bottom, right + extra * int(attrs.strides[1])],
            dilation=[int(d) for d in attrs.dilation], groups=1, data_layout="NHWC", kernel_layout="HWIO",
            out_layout="NHWC", out_dtype=attrs.out_dtype))
        return relax.op.strided_slice(conv, axes=[2], begin=[0], end=[shape[2]])
