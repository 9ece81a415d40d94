"""Which hand-written schedule each convolution kernel gets: the int8 dot-product kernel where the
CPU has one and the conv is int8, else the float register-blocked one; the rest is left to
MetaSchedule and the default schedule."""

from __future__ import annotations

import tvm

from .cpu_schedules import VectorUnit, schedule_conv2d_nhwc, schedule_unscheduled
from .int8_conv_schedule import dot_product_intrinsics, schedule_int8_conv2d_nhwc
from .winograd import schedule_winograd


def schedule_convolutions(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Every fused function of ``mod`` with a dense or depthwise float NHWC conv (or its Winograd
    form), or a dense int8 one where the CPU has an integer dot product, register-blocked for
    ``target``."""
    unit = VectorUnit.of(target)
    intrinsics = dot_product_intrinsics(target)

    def schedule(func):
        if intrinsics:
            scheduled = schedule_int8_conv2d_nhwc(func, intrinsics, unit.registers)
            if scheduled is not None:
                return scheduled
        return schedule_winograd(func, unit) or schedule_conv2d_nhwc(func, unit)

    return schedule_unscheduled(mod, schedule)
