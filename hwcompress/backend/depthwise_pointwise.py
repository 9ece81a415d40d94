"""A depthwise conv and the 1x1 conv that reads it, as one kernel computed per pixel tile.

In MobileNet-style inverted residuals (1x1 expand, depthwise, 1x1 project) the depthwise kernel
writes the whole expanded activation (56x56x144 floats: 1.8 MB) and the project conv reads it
back from L2 or memory. Fused, each parallel tile of the 1x1 conv's output pixels first computes
the depthwise conv, its bias and activation for those pixels and every channel into a tile buffer
(a few KB to tens of KB, in L1), one vector of channels at a time with the tile's pixels in
registers; the 1x1 conv's channel tiles then sweep that buffer. Measured on AMD Zen 4 (2 threads),
untuned, each block alone, merged / two kernels, in two of the VM's speed states: 576->96 at 14x14
0.86-0.97, 144->24 at 56x56 0.65-0.95, 192->32 at 28x28 0.88-0.94, 32->16 at 112x112 0.51-0.59;
MobileNetV2 fp32 0.86-0.95 (13 of its 17 pairs merged; three runs, 3.28 -> 3.12 ms in the fast state),
int8 (the shared QOperator model) 1.41 -> 1.27 ms with the same values bit for bit.

The pair is merged after TVM's own fusion (``FuseTIR`` over the two fused kernels): a float 1x1
conv, or an int8 one on the dot-product kernel (``int8_conv_schedule``), where the activation
outweighs the 1x1 weights (else each pixel tile would re-read all of them) and the merged kernel
takes the schedule; any other pair stays two kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

from .cpu_schedules import (CONV_BLOCKS, ConvTiles, VectorUnit, _is_float_hwio, _NotApplicable, _schedule,
                            _weights_outweigh_input, choose_tiles, has_block, is_depthwise, loops_below)
from .int8_conv_schedule import _is_int8_hwio, dot_product_intrinsics
from .int8_conv_schedule import _schedule as schedule_int8
from .relax_rewrite import is_call_tir, rewrite_blocks

DEPTHWISE_BLOCK, POINTWISE_BLOCK = CONV_BLOCKS[1], CONV_BLOCKS[0]


def fuse_depthwise_pointwise(mod: tvm.IRModule, target) -> tvm.IRModule:
    """``mod`` (fused kernels, after ``relax.get_pipeline("zero")``) with every depthwise kernel
    whose output only a 1x1 conv kernel reads merged into that one and scheduled for ``target``:
    float 1x1 convs, and int8 ones where the CPU has an integer dot product (the int8 model's
    depthwise conv reads 8-bit activations, computes in float and requantizes)."""
    kernel = _Kernel(VectorUnit.of(target), dot_product_intrinsics(target))
    return rewrite_blocks(mod, lambda builder, block, uses: _fuse_in_block(mod, builder, block, uses, kernel))


def _fuse_in_block(mod, builder, block, uses, kernel):
    """``block`` with each depthwise call that only a 1x1 conv call reads merged into that call
    (``block`` itself where there is none)."""
    bound = {b.var: b.value for b in block.bindings}
    merged = {}  # the 1x1 conv's variable -> its new call; the depthwise binding then goes
    for binding in block.bindings:
        second = binding.value
        if not is_call_tir(second) or not second.args[1].fields:
            continue
        first_var = second.args[1].fields[0]
        first = bound.get(first_var)
        if first is None or not is_call_tir(first) or uses.get(first_var) != 1:  # read by the 1x1 conv only
            continue
        if not (_is_depthwise(mod[first.args[0]]) and kernel.takes(mod[second.args[0]])):
            continue
        call = _merged_call(mod, builder, first_var, first, second, kernel)
        if call is not None:
            merged[binding.var] = (first_var, call)
    if not merged:
        return block
    gone = {first_var for first_var, _ in merged.values()}
    bindings = [relax.VarBinding(b.var, merged[b.var][1]) if b.var in merged else b
                for b in block.bindings if b.var not in gone]
    return relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(bindings)


def _conv(func, name: str, other: str):
    """(schedule, conv block) where ``func`` is an unscheduled kernel with a conv block ``name`` and
    none named ``other``, else None."""
    if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
        return None
    sch = Schedule(func)
    if not has_block(sch, name) or has_block(sch, other):
        return None
    return sch, sch.get_sblock(name)


def _is_depthwise(func) -> bool:
    """A depthwise conv the float schedule takes (in an int8 model it reads 8-bit activations)."""
    found = _conv(func, DEPTHWISE_BLOCK, POINTWISE_BLOCK)
    return found is not None and _is_float_hwio(*found) and is_depthwise(*found)


@dataclass(frozen=True)
class _Kernel:
    """What the merged kernel's 1x1 conv runs on: the float FMA, or the integer dot product
    (``intrinsics``: by accumulator lanes, empty where the CPU has none)."""

    unit: VectorUnit
    intrinsics: dict

    def takes(self, func) -> bool:
        """Whether ``func`` is a 1x1 stride-1 conv kernel this CPU's schedules cover."""
        found = _conv(func, POINTWISE_BLOCK, DEPTHWISE_BLOCK)
        if found is None or not (_is_float_hwio(*found) or self.intrinsics and _is_int8_hwio(*found)):
            return False
        sch, conv = found
        data, weight = (r.source for r in sch.get(conv).reads)
        out = sch.get(conv).writes[0].source
        return [int(d) for d in weight.shape[:2]] == [1, 1] and [int(d) for d in data.shape[1:3]] == [
            int(d) for d in out.shape[1:3]]

    def schedule(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        """The merged kernel scheduled: the 1x1 conv register-blocked with its channel tiles
        inside each pixel tile, the depthwise stage computed there; None where it does not apply."""
        sch = Schedule(func)
        pointwise, depthwise = sch.get_sblock(POINTWISE_BLOCK), sch.get_sblock(DEPTHWISE_BLOCK)
        if _weights_outweigh_input(sch, pointwise):
            # Every pixel tile would re-read all the 1x1 weights; the separate 1x1 conv streams them
            # once per thread instead (ShuffleNet's 232->232 at 7x7: 1.36x slower fused).
            return None
        int8 = str(sch.get(pointwise).writes[0].source.dtype) == "int32"
        unit = VectorUnit(max(self.intrinsics), self.unit.registers) if int8 else self.unit
        out_shape = [int(x) for x in sch.get(pointwise).writes[0].source.shape]
        tiles = choose_tiles(out_shape[2], out_shape[3], unit)
        if tiles is None or (int8 and tiles.lanes not in self.intrinsics):
            return None
        # The depthwise stage keeps one accumulator vector per pixel of the tile in registers.
        width = max(d for d in range(1, min(tiles.width, unit.registers // 2) + 1) if out_shape[2] % d == 0)
        tiles = ConvTiles(width, tiles.vectors, tiles.lanes)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        at = next(i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(pointwise)))
        stages = dict(keep=blocks[:at],  # the depthwise conv, its padding and epilogue, the 1x1 conv's padding
                      per_pixel_tile=lambda s, loop: _depthwise_at(s, loop, depthwise, self.unit.lanes))
        try:
            if int8:
                schedule_int8(sch, pointwise, tiles, self.intrinsics[tiles.lanes], **stages)
            else:
                _schedule(sch, pointwise, tiles, **stages)
        except (ScheduleError, _NotApplicable, tvm.error.InternalError, StopIteration):
            return None
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _merged_call(mod, builder, first_var, first, second, kernel):
    """One ``call_tir`` of the merged, scheduled kernel in place of ``first`` then ``second``, or
    None where the schedule does not take the merged kernel."""
    outer = []
    for arg in list(first.args[1].fields) + [a for a in second.args[1].fields if not a.same_as(first_var)]:
        if not any(arg.same_as(o) for o in outer):
            outer.append(arg)
    merged = _merged_kernel(mod, first, second, first_var, outer, kernel)
    if merged is None:
        return None
    name = "fused_" + "_".join(g.name_hint.removeprefix("fused_") for g in (first.args[0], second.args[0]))
    gvar = builder.add_func(merged, name)
    return relax.call_tir(gvar, relax.Tuple(outer), second.ty_args[0])


def _merged_kernel(mod, first, second, first_var, outer, kernel):
    """The two kernels as one PrimFunc (TVM's FuseTIR over a function calling both), scheduled."""
    params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(outer)]

    def param(arg):
        return next(p for o, p in zip(outer, params) if o.same_as(arg))

    inner = relax.DataflowVar("depthwise", first.ty)
    out = relax.Var("out", second.ty)
    calls = [relax.Call(first.op, [first.args[0], relax.Tuple([param(a) for a in first.args[1].fields])],
                        first.attrs, first.ty_args),
             relax.Call(second.op, [second.args[0], relax.Tuple([inner if a.same_as(first_var) else param(a)
                                                                 for a in second.args[1].fields])],
                        second.attrs, second.ty_args)]
    body = relax.SeqExpr([relax.DataflowBlock([relax.VarBinding(inner, calls[0]), relax.VarBinding(out, calls[1])])],
                         out)
    pair = relax.BlockBuilder(tvm.IRModule({first.args[0]: mod[first.args[0]], second.args[0]: mod[second.args[0]]}))
    fused = pair.add_func(relax.Function(params, body, second.ty).with_attr("Primitive", True), "pair")
    main_params = [relax.Var(f"a{i}", a.ty) for i, a in enumerate(outer)]
    pair.add_func(relax.Function(main_params, relax.Call(fused, main_params), second.ty)
                  .with_attr("global_symbol", "main"), "main")  # public: FuseTIR keeps what it reaches
    merged = relax.transform.FuseTIR()(pair.get())
    kernels = [f for f in merged.functions.values() if isinstance(f, tirx.PrimFunc)
               and has_block(Schedule(f), DEPTHWISE_BLOCK) and has_block(Schedule(f), POINTWISE_BLOCK)]
    if len(kernels) != 1:
        return None
    return kernel.schedule(kernels[0])


def _depthwise_at(sch: Schedule, pixel_tile, depthwise, lanes: int) -> None:
    """Inside ``pixel_tile``: the depthwise conv's epilogue (bias, activation: one block, written to
    the tile buffer the 1x1 conv reads) per vector of channels (``lanes``, or the widest vector of
    4 or more lanes that divides the channels), the depthwise conv for that vector
    computed into registers just before it, its padding read with border checks."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    at = next(i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(depthwise)))
    padding = sch.get_producers(depthwise)  # not the 1x1 weights' repacking, which is also before it
    # The 1x1 conv is already in the pixel tile; what is left after the depthwise conv is its epilogue.
    epilogue = [b for b in blocks[at + 1:] if not _has_loop(sch, b, pixel_tile)]
    if not epilogue:
        raise _NotApplicable("the depthwise conv has no stage between it and the 1x1 conv")
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    activation = epilogue[-1]
    sch.compute_at(activation, pixel_tile)
    *pixels, channels = loops_below(sch, activation, pixel_tile)
    count = int(sch.get(channels).extent)
    lanes = next((v for v in (lanes, lanes // 2, 4) if v >= 4 and count % v == 0), 0)
    if not lanes:
        raise _NotApplicable(f"no vector of 4 or more lanes divides the {count} depthwise channels")
    vectors, vector_lanes = sch.split(channels, [None, lanes])
    sch.reorder(vectors, *pixels, vector_lanes)
    sch.vectorize(vector_lanes)
    sch.compute_at(depthwise, vectors)
    sch.set_scope(depthwise, 0, "local")
    weight = sch.get(depthwise).reads[1].source
    taps = sum(int(d) > 1 for d in weight.shape[:2])  # kernel rows and columns (1 for a 1x3)
    loops = loops_below(sch, depthwise, vectors)
    spatial, reduction = loops[:len(loops) - taps], loops[len(loops) - taps:]
    sch.reorder(*reduction, *spatial)
    sch.vectorize(spatial[-1])
    for loop in spatial[:-1] + reduction:
        sch.unroll(loop)
    for block in padding:
        sch.compute_inline(block)
    if reduction:
        init = sch.decompose_reduction(depthwise, reduction[0])
        *init_pixels, init_lanes = loops_below(sch, init, vectors)
        sch.vectorize(init_lanes)
        for loop in init_pixels:
            sch.unroll(loop)


def _has_loop(sch: Schedule, block, loop) -> bool:
    """Whether ``block`` is nested in ``loop``."""
    return any(sch.get(candidate).same_as(sch.get(loop)) for candidate in sch.get_loops(block))

