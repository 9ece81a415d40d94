"""Hand-written CPU schedule for NHWC convolutions (dense and depthwise), the kernels that
dominate CNN latency.

MetaSchedule's generic search space needs hundreds of trials per conv to find a good kernel on a
CPU, and on this project's machines it plateaued at about twice ONNX Runtime's time. The schedule
below is the classic register-blocked direct convolution (the structure of oneDNN's and MLAS's
kernels): an output tile of ``width_tile`` pixels x ``channel_tile`` channels lives in vector
registers while the reduction runs over kernel rows, columns and input channels; each step
broadcasts one input value (depthwise: loads the matching input lanes) and does one FMA per
accumulator vector with contiguous weights (dense convs: repacked per channel tile at compile time). The epilogue (bias, activation, residual add)
is applied to the tile in registers and the output written once. Tile sizes follow from the
target's vector width and register count, so the kernel is good without tuning, also for targets
that cannot be tuned from here (arm-a72 cross-compiled).

A fused function is scheduled only when it has exactly this shape (one ``conv2d_nhwc`` or
``group_conv2d_nhwc`` block, float32, weights HWIO, optional padding and elementwise epilogue;
a grouped conv's channel tile within one group); anything else (int8 outside
``int8_conv_schedule``) is left to MetaSchedule. Scheduled functions
carry ``tirx.is_scheduled`` so tuning skips them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

from ..config.vector_unit import VectorUnit, widest_lanes

# TOPI's block names: dense convs, and grouped ones (depthwise is the case with one input channel per group).
CONV_BLOCKS = ("conv2d_nhwc", "group_conv2d_nhwc")


@dataclass(frozen=True)
class ConvTiles:
    width: int       # output pixels along W per register tile
    vectors: int     # accumulator vectors along output channels per pixel
    lanes: int

    @property
    def channels(self) -> int:
        return self.vectors * self.lanes


def choose_tiles(out_width: int, out_channels: int, unit: VectorUnit) -> ConvTiles | None:
    """The largest register tile that fits: accumulators + one weight row + one broadcast."""
    lanes = widest_lanes(out_channels, unit.lanes)
    if not lanes:
        return None
    best = None
    for vectors in (2, 1, 3, 4):
        if out_channels % (vectors * lanes):
            continue
        max_width = (unit.registers - vectors - 1) // vectors
        width = max((d for d in range(1, min(out_width, max_width) + 1) if out_width % d == 0), default=1)
        # Enough accumulators (a quarter of the registers) to hide the FMA latency; a narrow tile
        # with more vectors also will do (widths like 111 = 3 x 37 have no better divisor).
        enough = width * vectors >= unit.registers // 4 or width == out_width
        score = width * vectors if enough else 0
        if best is None or score > best[0]:
            best = (score, ConvTiles(width, vectors, lanes))
    return best[1] if best and best[0] > 0 else None


class _NotApplicable(Exception):
    pass


def schedule_conv2d_nhwc(func: tirx.PrimFunc, unit: VectorUnit) -> tirx.PrimFunc | None:
    """``func`` with its dense or depthwise NHWC conv register-blocked, or None where it does not apply."""
    sch = Schedule(func)
    conv = _conv_block(sch)
    if conv is None or not _is_float_hwio(sch, conv):
        return None
    out_shape = [int(x) for x in sch.get(conv).writes[0].source.shape]
    tiles = choose_tiles(out_shape[2], channels_per_group(sch, conv), unit)
    if tiles is None:
        return None
    try:
        _schedule(sch, conv, tiles)
    except (ScheduleError, _NotApplicable, tvm.error.InternalError):  # TVM checks some cases only internally
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _conv_block(sch: Schedule):
    for name in CONV_BLOCKS:
        try:
            return sch.get_sblock(name)
        except Exception:  # no block of that name
            continue
    return None


def _is_float_hwio(sch: Schedule, conv) -> bool:
    """A float32 conv with HWIO weights, dense (I = input channels), grouped (I = input channels
    per group) or depthwise (I = 1, one output channel per input channel): in each, output channel
    lanes read contiguous weights and either one broadcast input value (dense; grouped, where a
    channel tile stays inside one group) or the matching input lanes (depthwise)."""
    block = sch.get(conv)
    loops = sch.get_loops(conv)
    if len(block.iter_vars) != 7 or len(loops) != 7 or len(block.reads) != 2:
        return False
    if [iv.iter_type for iv in block.iter_vars] != [0, 0, 0, 0, 2, 2, 2]:  # SSSS RRR
        return False
    data, weight = (region.source for region in block.reads)  # buffers
    out = block.writes[0].source
    if not all(b.dtype == "float32" for b in (weight, out)) or len(weight.shape) != 4:
        return False
    in_channels, out_channels = int(data.shape[3]), int(out.shape[3])
    per_group = int(weight.shape[2])
    groups = in_channels // per_group
    dense = per_group == in_channels and data.dtype == "float32"
    grouped = 1 < per_group < in_channels and data.dtype == "float32" and in_channels % per_group == 0 \
        and out_channels % groups == 0
    # An int8 model's depthwise conv reads its 8-bit input lanes and converts them (int8_lowering).
    depthwise = per_group == 1 and in_channels == out_channels and data.dtype in ("float32", "uint8", "int8")
    return int(weight.shape[3]) == out_channels and (dense or grouped or depthwise)


def is_depthwise(sch: Schedule, conv) -> bool:
    """One input channel per output channel (the weights' I axis is 1)."""
    return int(sch.get(conv).reads[1].source.shape[2]) == 1


def channels_per_group(sch: Schedule, conv) -> int:
    """Output channels per group (all of them in a dense conv): a register tile must not straddle
    two groups, whose lanes would read different input channels."""
    data, weight = (region.source for region in sch.get(conv).reads)
    out_channels = int(sch.get(conv).writes[0].source.shape[3])
    if is_depthwise(sch, conv):
        return out_channels
    return out_channels // (int(data.shape[3]) // int(weight.shape[2]))


def _schedule(sch: Schedule, conv, tiles: ConvTiles, keep=(), per_pixel_tile=None) -> None:
    """The register-blocked schedule of ``conv``. ``keep``: blocks before the conv that are stages
    of this kernel, not side inputs (``fuse_epilogue``); ``per_pixel_tile(sch, loop)``: computes
    them inside each parallel pixel tile, ``loop`` (the channel tiles then run inside it, so
    that what that stage writes is read while it is in cache: ``depthwise_pointwise``)."""
    depthwise = is_depthwise(sch, conv)
    epilogue = fuse_epilogue(sch, conv, keep)
    if not depthwise:
        _pack_weights(sch, conv, tiles.channels)
    n, h, w, o, rh, rw, rc = sch.get_loops(conv)
    w_outer, w_inner = sch.split(w, [None, tiles.width])
    o_outer, o_vectors, o_lanes = sch.split(o, [None, tiles.vectors, tiles.lanes])
    inside = []
    if per_pixel_tile is not None:
        parallel, inside = [n, h, w_outer], [o_outer]
    elif _weights_outweigh_input(sch, conv):
        # Each thread streams its share of the weights once and re-reads the (smaller) input.
        parallel = [n, o_outer, h, w_outer]
    else:
        # Each pixel tile's input stays in L1 while all channel tiles sweep the small weights.
        parallel = [n, h, w_outer, o_outer]
    sch.reorder(*parallel, *inside, rh, rw, rc, w_inner, o_vectors, o_lanes)
    # The tile's accumulators live in registers; the epilogue reads them there and writes the
    # output once (no full-size intermediate buffer written and read back).
    store = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(store, (parallel + inside)[-1])
    if epilogue is not None:
        sch.reverse_compute_inline(epilogue)
    pixel_tiles = sch.fuse(*parallel)
    sch.parallel(pixel_tiles)
    sch.vectorize(o_lanes)
    sch.unroll(o_vectors)
    sch.unroll(w_inner)
    tile_loop = inside[-1] if inside else pixel_tiles
    store_tile(sch, store, tile_loop, tiles.lanes)
    for producer in sch.get_producers(conv):  # the padding
        _schedule_input(sch, producer, tiles.lanes, depthwise)
    init_tile(sch, sch.decompose_reduction(conv, rh), tile_loop)
    if per_pixel_tile is not None:
        per_pixel_tile(sch, pixel_tiles)


def store_tile(sch: Schedule, store, tile_loop, lanes: int) -> None:
    """The register tile written out (with its epilogue) inside ``tile_loop``: vectors along
    channels, the tile's pixels and vectors unrolled. Only loops below ``tile_loop``: where the tile
    is one pixel wide TVM drops that loop, and the parallel loop above must not be unrolled in its
    place (it was: a 1x1 conv over 784 one-pixel rows took 8 minutes to compile, one thread to run)."""
    *pixels, channels = loops_below(sch, store, tile_loop)
    vectors, vector_lanes = sch.split(channels, [None, lanes])
    sch.vectorize(vector_lanes)
    sch.unroll(vectors)
    for loop in pixels:
        sch.unroll(loop)


def init_tile(sch: Schedule, init, tile_loop) -> None:
    """The accumulators' zeroing (``decompose_reduction``'s block) inside ``tile_loop``: vectors
    along channels, the rest unrolled; as ``store_tile``, only loops below ``tile_loop``."""
    *pixels, vectors, vector_lanes = loops_below(sch, init, tile_loop)
    sch.vectorize(vector_lanes)
    sch.unroll(vectors)
    for loop in pixels:
        sch.unroll(loop)


def _pack_weights(sch: Schedule, conv, channels: int) -> None:
    """Weights in the order the kernel reads them: each channel tile's filters contiguous
    ([O / tile][KH][KW][I][tile]), so a thread streams them from memory sequentially instead of
    128 bytes at a stride of the channel count (HWIO). The repacking block is marked as a layout
    rewrite: ``build.cpu_kernels`` splits it out and folds it into the constant at compile
    time (measured on ResNet-18, whose 45 MB of weights stream from memory each run: 1.18x of
    ONNX Runtime before, 1.00x after)."""
    packed = sch.cache_read(conv, 1, "global")
    sch.transform_layout(conv, ("read", 1),
                         lambda kh, kw, i, o: (o // channels, kh, kw, i, o % channels))
    sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)


def _weights_outweigh_input(sch: Schedule, conv) -> bool:
    """Loop order choice: the operand re-read per tile should be the smaller one. Measured on
    ResNet-18 (weights 45 MB, streamed from memory each run): channel tiles innermost ran 1.3x
    slower in the model; on MobileNetV2's 1x1 layers (weights of a few KB) 1.4x faster."""
    data, weight = (region.source for region in sch.get(conv).reads)
    size = lambda buffer: int(np.prod([int(d) for d in buffer.shape]))  # noqa: E731
    return size(weight) > size(data)


def fuse_epilogue(sch: Schedule, conv, keep=()):
    """Inline every elementwise block after the conv (bias, any activation chain: SiLU's
    ``x * sigmoid(x)`` and HardSwish read the conv output twice, a residual add, a per-channel
    scale) into the last one, and return that block (None where the conv is the last).
    ``keep``: blocks before the conv that are stages of it, not side inputs to inline."""
    after = _blocks_after(sch, conv)
    shape = lambda block: [int(d) for d in sch.get(block).writes[0].source.shape]  # noqa: E731
    if after and (len(shape(after[-1])) != len(shape(conv))
                  or any(e > c for e, c in zip(shape(after[-1]), shape(conv)))):
        # e.g. a squeeze-and-excitation scale: the 1x1 conv on the pooled vector broadcast over a
        # whole feature map. Its epilogue does not fit the conv's output tile (a slice of it does:
        # channels padded to whole vectors are cut off there).
        raise _NotApplicable("the epilogue writes more than the conv's output")
    for block in after[:-1]:
        sch.compute_inline(block)
    if after:
        _inline_side_inputs(sch, conv, after[-1], keep)
    if after and sch.get_consumers(conv) and [sch.get(b) for b in sch.get_consumers(conv)] != [sch.get(after[-1])]:
        raise _NotApplicable("the conv output is read by more than its epilogue")
    return after[-1] if after else None


def _inline_side_inputs(sch: Schedule, conv, epilogue, keep=()) -> None:
    """Elementwise blocks that feed the epilogue from elsewhere (an int8 residual's dequantize:
    cast, subtract the zero point, scale) inlined into it: TVM inlines an epilogue into the
    conv's register tile only when it reads no intermediate buffer of the same function."""
    keep = {conv, epilogue, *sch.get_producers(conv), *keep}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if not any(sch.get(block).same_as(sch.get(k)) for k in keep):
            try:
                sch.compute_inline(block)
            except ScheduleError as exc:
                raise _NotApplicable("a side input of the epilogue is not elementwise") from exc


def _blocks_after(sch: Schedule, conv) -> list:
    """The blocks that (transitively) read the conv output, in program order."""
    downstream, frontier = [], [conv]
    while frontier:
        for consumer in sch.get_consumers(frontier.pop()):
            if not any(sch.get(consumer).same_as(sch.get(b)) for b in downstream):
                downstream.append(consumer)
                frontier.append(consumer)
    order = [b for b in sch.get_child_blocks(sch.get_sblock("root"))] if has_block(sch, "root") else downstream
    return [b for b in order if any(sch.get(b).same_as(sch.get(d)) for d in downstream)]


def has_block(sch: Schedule, name: str) -> bool:
    """Whether the scheduled function has a block of that name (``root``: not every one does)."""
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # no block of that name
        return False


def loops_below(sch: Schedule, block, loop) -> list:
    """The block's loops inside ``loop``."""
    loops = sch.get_loops(block)
    at = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(sch.get(loop)))
    return loops[at + 1:]


def _schedule_input(sch: Schedule, block, lanes: int, depthwise: bool) -> None:
    """The conv's input producer (padding): inlined where it only copies (no padding) or where
    the conv is depthwise (9 FMAs per output: a separate padded copy of the input cost more than
    the border checks, measured 2x on MobileNetV2's layers); else its own pass, parallel over
    rows with vectors along channels (dense 3x3 convs ran 2.3x slower with the checks inlined)."""
    stmt = sch.get(block)
    if depthwise or len(stmt.reads) == 1 and list(stmt.reads[0].source.shape) == list(stmt.writes[0].source.shape):
        sch.compute_inline(block)
    else:
        _schedule_elementwise(sch, block, lanes)


def _schedule_elementwise(sch: Schedule, block, lanes: int) -> None:
    """Padding and other producers: parallel over rows, vectors along channels."""
    loops = sch.get_loops(block)
    if len(loops) != 4:
        return
    sch.parallel(sch.fuse(loops[0], loops[1]))
    if _divides(sch, loops[3], lanes):
        sch.vectorize(sch.split(loops[3], [None, lanes])[1])


def _divides(sch: Schedule, loop, lanes: int) -> bool:
    extent = sch.get(loop).extent
    return isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0


def is_scheduled(func) -> bool:
    """Whether a kernel already has its schedule (and so is not for MetaSchedule)."""
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled"))


def schedule_unscheduled(mod: tvm.IRModule, schedule) -> tvm.IRModule:
    """``mod`` with every PrimFunc that has no schedule yet replaced by ``schedule(func)``, where
    that gives one (None: left as it is)."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
            scheduled = schedule(func)
            if scheduled is not None:
                updates[gvar] = scheduled
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def nhwc_layout(mod: tvm.IRModule) -> tvm.IRModule:
    """Convolutions in NHWC with HWIO weights: channels innermost, where the vector lanes are
    (pads and channel shuffles moved to that side of the layout transposes).
    Transposed convolutions stay NCHW: TVM 0.27 can only lower those (in NHWC one reached the VM
    unlowered and the build failed)."""
    from .layout_transposes import nhwc_side

    return nhwc_side(relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"],
                                                    "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]})(mod))
