"""A rule-based CPU schedule for the kernels that neither the project's conv schedule nor a tuning
record covers (pooling, resize, concat, transposes, softmax, an untuned dense layer): elementwise
producers inlined, the outer spatial loops fused and spread over the thread pool, the innermost
spatial loop vectorized where the vector lanes divide it (in a reduction, the lanes are output
channels and the reduction loops run around them: pools, a squeeze-and-excitation FC). Without it such a kernel runs as
TVM's naive single-threaded loop nest (a YOLO-style detector ran 18x slower than ONNX Runtime
untuned); MetaSchedule records, where tuning made them, still take precedence."""

from __future__ import annotations

import math
import os

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.dlight import normalize_prim_func, try_inline
from tvm.s_tir.schedule import ScheduleError

from ..config.vector_unit import widest_lanes
from .cpu_schedules import schedule_unscheduled


TASKS_PER_CORE = 8  # parallel iterations per core: enough to balance the load, few enough to stay cheap


def schedule_untuned(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every PrimFunc of ``mod`` without a schedule, given the default one."""
    return schedule_unscheduled(mod, lambda func: default_schedule(func, lanes))


def default_schedule(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    sch = default_schedule_of(func, lanes)
    return None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True)


def default_schedule_of(func: tirx.PrimFunc | tvm.IRModule, lanes: int, cores: int | None = None) -> Schedule | None:
    """The default schedule as a ``Schedule`` (its trace can be stored as a tuning record), or
    None where the kernel has a form it does not handle. Only the outer spatial loops are spread
    over the threads, as few as give ``TASKS_PER_CORE`` iterations per core (``cores``: the target's
    num-cores, else this machine's): the input layer of an int8 model (NCHW float -> NHWC 4-channel
    uint8 with padding) ran 0.20 ms with every spatial loop fused into one parallel loop (index
    arithmetic per pixel) and 0.06 ms parallel over rows, pixels serial and channels vectorized."""
    tasks = TASKS_PER_CORE * (cores or target_cores(tvm.target.Target.current(allow_none=True)))
    sch = Schedule(func)
    if _softmax_by_rows(sch, lanes):
        return sch
    sch = Schedule(func)
    if _transpose_by_tiles(sch, lanes):
        return sch
    sch = Schedule(func)
    try:
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        if _rows_before_transpose(sch, infos, lanes):
            return sch
        reductions = []
        for info in try_inline(sch, infos):
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if len(loops) != len(kinds) or not loops:
                continue
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
            other = [loop for loop, kind in zip(loops, kinds) if kind == "O"]
            if not spatial:
                continue
            sch.reorder(*spatial, *reduce, *other)
            inner = None
            innermost = _extent(sch, spatial[-1])
            if not reduce and not other and len(spatial) > 1 and _vectorizable(innermost, lanes):
                *spatial, inner = spatial
            last_var = [it.var for it in info.iters if it.kind == "S"][-1]
            across = _lanes_across_reduction(sch.get(block), last_var, innermost, lanes) if reduce and not other else 0
            if across:
                *spatial, last = spatial
                outer_lanes, inner = sch.split(last, [None, across])
                spatial.append(outer_lanes)
                sch.reorder(*spatial, *reduce, inner)
            outer, product = [], 1
            for loop in spatial:
                if product >= tasks:
                    break
                outer.append(loop)
                product *= _extent(sch, loop) or tasks
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            if across:
                sch.vectorize(inner)
            elif inner is not None:
                _vectorize(sch, inner, lanes)
            if reduce:
                reductions.append((block, reduce[0], across))
        for block, loop, across in reductions:
            init = sch.decompose_reduction(block, loop)
            if across:
                sch.vectorize(sch.get_loops(init)[-1])
    except (ScheduleError, tvm.error.InternalError, ValueError):
        return None
    return sch


_SOFTMAX = ("T_softmax_maxelem", "T_softmax_exp", "T_softmax_expsum", "T_softmax_norm")


def _softmax_by_rows(sch: Schedule, lanes: int) -> bool:
    """A softmax over the last axis, one row at a time, rows in parallel: the row's maximum, its
    exponentials (computed once, kept for the sum and the division), their sum and the quotients,
    all while the row is in cache, in one parallel loop. The generic path inlined the exponential
    into both the sum and the division (every exp twice) and ran three parallel loops over the
    whole tensor: ViT-Tiny's attention softmax (3 x 197 x 197) took 0.27 ms, half its block.
    False (schedule untouched) where the kernel is not TVM's four softmax blocks."""
    try:
        blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except (ScheduleError, tvm.error.InternalError, ValueError):
        return False
    if sorted(blocks) != sorted(_SOFTMAX):
        return False
    maxelem, exp, expsum, norm = (blocks[name] for name in _SOFTMAX)
    try:
        *outer, last = sch.get_loops(norm)
        row = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(row)
        for block in (expsum, exp, maxelem):
            sch.compute_at(block, row)
        for block in (exp, norm):
            inner = sch.get_loops(block)[-1]
            if _vectorizable(_extent(sch, inner), lanes):
                _vectorize(sch, inner, lanes)
    except (ScheduleError, tvm.error.InternalError, ValueError):
        return False
    return True


TRANSPOSE_TILE = 8  # elements a side of a transpose's tile (AMD Zen 5: 8x8 beat 4x16, 8x16 and 16x8)
MIN_TRANSPOSED = 32768  # elements: below, the untiled loop is as fast (14x14x96: 0.003 ms either way)


def _transpose_by_tiles(sch: Schedule, lanes: int) -> bool:
    """A transpose that moves the innermost axis (the layout transposes at a model's edges, NHWC
    <-> NCHW; a key matrix transposed for attention), by square tiles: each tile reads a few
    consecutive elements of each of ``TRANSPOSE_TILE`` input rows and writes whole vectors along the
    output's innermost axis, so both sides use every cache line they touch. The untiled loop read
    one element per cache line along the output row: YOLO's 80x80x255 head output as NCHW took
    0.45 ms, 0.15 tiled; a 160x160x64 one 0.74 and 0.15, a 64x160x160 input to NHWC 2.09 and 0.35
    (AMD Zen 5, 2 threads, each transpose alone). False (schedule untouched) where the kernel is
    not one block copying one buffer with its axes permuted, or either moved axis is shorter than a
    tile."""
    tile = min(TRANSPOSE_TILE, lanes)
    try:
        [block] = sch.get_child_blocks(sch.get_sblock("root"))
        stmt = sch.get(block)
        if len(stmt.reads) != 1 or len(stmt.writes) != 1 or any(iv.iter_type != 0 for iv in stmt.iter_vars):
            return False
        variables = [iv.var for iv in stmt.iter_vars]
        read, written = ([r.min for r in region.region if not isinstance(r.min, tirx.IntImm)]  # unit axes are constants
                         for region in (stmt.reads[0], stmt.writes[0]))
        if not all(isinstance(v, tirx.Var) for v in read + written) or len(read) != len(variables) \
                or len(written) != len(variables):
            return False
        position = {v: k for k, v in enumerate(variables)}
        if sorted(position.get(v, -1) for v in read) != list(range(len(variables))):
            return False
        loops = sch.get_loops(block)
        if len(loops) != len(variables):
            return False
        moved, last = position[read[-1]], position[written[-1]]
        extents = [_extent(sch, loop) for loop in loops]
        if moved == last or min(extents[moved], extents[last]) < tile or math.prod(extents) < MIN_TRANSPOSED:
            return False
        moved_outer, moved_inner = sch.split(loops[moved], [None, tile])
        last_outer, last_inner = sch.split(loops[last], [None, tile])
        outer = [loop for k, loop in enumerate(loops) if k not in (moved, last)]
        sch.reorder(*outer, moved_outer, last_outer, moved_inner, last_inner)
        sch.parallel(sch.fuse(*outer, moved_outer) if outer else moved_outer)
        sch.unroll(moved_inner)
        sch.vectorize(last_inner)
    except (ScheduleError, tvm.error.InternalError, ValueError):
        return False
    return True


def _rows_before_transpose(sch: Schedule, infos, lanes: int) -> bool:
    """A kernel that computes a tensor and writes it out transposed (a bilinear resize in NHWC
    leaving the model as NCHW): computed whole, inlined into the transpose, each output vector
    repeats the index arithmetic and gathers its inputs (a U-Net's final 2x resize of 4 channels
    to 256x256 ran 0.28 ms so). Instead the transpose runs over the producer's rows in parallel,
    each row computed just before (in cache, its channels in vector lanes) and written out
    transposed: 0.10 ms. False (schedule untouched) where the kernel is not one injective block
    read by one transpose."""
    if len(infos) != 2 or any(it.kind != "S" for info in infos for it in info.iters):
        return False
    producer, last = infos
    reads, writes = sch.get(last.block_rv).reads, sch.get(producer.block_rv).writes
    if len(reads) != 1 or len(writes) != 1 or not reads[0].source.same_as(writes[0].source):
        return False
    variables = [it.var for it in last.iters]
    order = [next((k for k, v in enumerate(variables) if v.same_as(r.min)), None)
             for r in reads[0].region if not isinstance(r.min, tirx.IntImm)]  # unit axes are constants
    if len(order) < 3 or None in order or sorted(order) != list(range(len(variables))) or order == sorted(order):
        return False
    loops = sch.get_loops(last.block_rv)
    rows = [loops[k] for k in order[:-2]]  # the producer's outer axes (batch, row), in its order
    sch.reorder(*rows, *[loop for k, loop in enumerate(loops) if k not in order[:-2]])
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.parallel(row)
    sch.compute_at(producer.block_rv, row)
    for block in (producer.block_rv, last.block_rv):
        inner = sch.get_loops(block)[-1]
        if _vectorizable(_extent(sch, inner), lanes):
            _vectorize(sch, inner, lanes)
    return True


def _lanes_across_reduction(block, var, extent: int, lanes: int) -> int:
    """Vector lanes for a reduction whose innermost output axis is also the innermost, contiguous
    axis of everything it reads with it (a global average pool over NHWC, a squeeze-and-excitation
    FC on HWIO weights): each lane accumulates its own output, the reduction loops run outside the
    lanes, and every load is a whole vector. 0 where the axis is not such (a softmax's row sum
    reduces along the contiguous axis itself) or no power of two from 4 lanes up divides it.
    A global pool over 56x56x16 ran 0.023 ms as scalar loops, an SE FC reading its weights by
    column 0.037 ms."""
    vector = widest_lanes(extent, lanes)
    if not vector:
        return 0
    for region in [*block.reads, *block.writes]:
        mins = [r.min for r in region.region]
        uses = [i for i, m in enumerate(mins) if _mentions(m, var)]
        if uses and (uses != [len(mins) - 1] or not mins[-1].same_as(var)):
            return 0
    return vector


def _vectorizable(extent: int, lanes: int) -> bool:
    return extent % lanes == 0 or 2 <= extent <= lanes


def _vectorize(sch: Schedule, loop, lanes: int) -> None:
    """A whole vector's worth of ``loop`` at a time, or all of a short axis (4 channels)."""
    sch.vectorize(sch.split(loop, [None, lanes])[1] if _extent(sch, loop) % lanes == 0 else loop)


def _mentions(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _extent(sch: Schedule, loop) -> int:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else 0


def target_cores(target) -> int:
    """The target's num-cores (a board's through RPC, say), else this machine's CPU count."""
    cores = target.attrs.get("num-cores") if target is not None else None
    return int(cores) if cores else (os.cpu_count() or 1)
