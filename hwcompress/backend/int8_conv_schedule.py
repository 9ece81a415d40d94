"""Register-blocked int8 NHWC convolution on the CPU's integer dot-product instruction.

The int8 lowering turns a QDQ conv into ``conv2d(u8 activations, s8 weights) -> int32`` followed by
its requantize epilogue (zero-point correction, per-channel scale, bias, ...). Untouched, TVM runs
that as a scalar int32 loop nest (MobileNetV2 int8: 27x slower than ONNX Runtime's int8). Here it
gets the structure of ``cpu_schedules``' float kernel with the FMA replaced by ``vpdpbusd``
(AVX512-VNNI): one instruction multiplies 4 consecutive input channels of one pixel (u8, broadcast
as one 32-bit word) by the matching 4 weights of each of 16 output channels (s8, one 64-byte
vector) and adds the 4 products into 16 int32 accumulators. So an output tile of pixels x 16-lane
channel vectors stays in registers while the reduction runs over kernel rows, columns and groups
of 4 input channels; the weights are repacked at compile time to ``[O/tile][KH][KW][I/4][tile/16]
[16][4]``, the layout the instruction reads; the epilogue is applied to the tile in registers.

Applies to dense convs with u8 data, s8 weights, input channels a multiple of 4 and output
channels a multiple of 8, on CPUs whose LLVM target has ``avx512vnni`` (16 and 8 lanes) or
``avxvnni`` (8 lanes, 16 registers); anything else is left to the generic path (and the search's
measurement decides whether int8 pays there).
"""


import functools

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

from ..config.vector_unit import has_feature
from .cpu_schedules import (VectorUnit, fuse_epilogue, _NotApplicable, _schedule_input, _weights_outweigh_input,
                            choose_tiles, init_tile, store_tile)
from .int8_lowering import DOT_GROUP as GROUP  # input channels one vpdpbusd lane sums


def dot_product_intrinsics(target) -> dict[int, str]:
    """The tensor intrinsics for the target's 4-byte integer dot product by accumulator lanes
    (x86: u8 x s8, 16 lanes zmm and 8 lanes ymm for output channel counts like 24; Arm: s8 x s8,
    4 lanes), empty without one. Each is registered with TVM when first looked up."""
    if has_feature("avx512vnni", target):
        return _Registered({lanes: functools.partial(_register_vnni, lanes) for lanes in (16, 8)})
    if has_feature("avxvnni", target):  # VEX-encoded, 256-bit only (Intel client cores, Sierra Forest)
        return _Registered({8: functools.partial(_register_vnni, 8)})
    if has_feature("neon", target):
        return _Registered({4: functools.partial(_register_neon, has_feature("dotprod", target))})
    return {}


class _Registered(dict):
    """Lanes -> intrinsic name, the intrinsic registered on the first lookup of its name: parsing
    its TVMScript takes 0.7 s a process, which a model without int8 convs (every float compile)
    never needs. Which lanes exist is known without it."""

    def __getitem__(self, lanes: int) -> str:
        return super().__getitem__(lanes)()


def dot_product_instructions(target) -> str:
    """The instructions the int8 kernels use on ``target``, in words (for the report)."""
    if has_feature("avx512vnni", target):
        return "vpdpbusd (AVX512-VNNI)"
    if has_feature("avxvnni", target):
        return "vpdpbusd (AVX-VNNI, 256-bit)"
    if has_feature("neon", target):
        return "sdot (Arm dot product)" if has_feature("dotprod", target) else "smull, saddlp, addp (NEON)"
    return "no dot-product instruction: generic integer code (measured, not assumed faster)"


def dot_product_activations(target) -> str:
    """The byte type of the activations the target's dot product multiplies the int8 weights by:
    x86's vpdpbusd takes unsigned bytes, Arm's sdot and smull signed ones."""
    return "int8" if has_feature("neon", target) else "uint8"


def _dot_description(lanes: int, activations: str):
    """What every dot-product intrinsic computes: ``lanes`` int32 accumulators (in ``local``, the
    register tile), each adding 4 activation bytes times its own 4 weight bytes."""
    from tvm.script import tirx as T

    s8, s32, local = "int8", "int32", "local"  # names, not literals, in the TVMScript signatures

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), activations, offset_factor=1), b: T.Buffer((lanes, 4), s8, offset_factor=1),
             c: T.Buffer((lanes,), s32, offset_factor=1, scope=local)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc


@functools.lru_cache(maxsize=None)
def _register_vnni(lanes: int) -> str:
    """``vpdpbusd`` on 512-bit (16 lanes) or 256-bit (8 lanes) vectors: the 4 activation bytes
    broadcast as one 32-bit word to every lane."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T
    from tvm.target.codegen import llvm_version_major

    # LLVM 21 retyped the VNNI intrinsics' byte operands from <N x i32> to <4N x i8>.
    operand = f"int8x{4 * lanes}" if llvm_version_major() >= 21 else f"int32x{lanes}"
    accumulators = f"int32x{lanes}"
    u8, s8, s32, local = "uint8", "int8", "int32", "local"
    instruction = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), u8, offset_factor=1), b: T.Buffer((lanes, 4), s8, offset_factor=1),
             c: T.Buffer((lanes,), s32, offset_factor=1, scope=local)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            word = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            weights = T.reinterpret(b.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=operand)
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(instruction), c.vload([0], dtype=accumulators),
                T.reinterpret(T.broadcast(word, lanes), dtype=operand), weights, dtype=accumulators)

    name = f"hwc_vpdpbusd_{lanes}x4_local"
    TensorIntrin.register(name, _dot_description(lanes, u8), impl)
    return name


@functools.lru_cache(maxsize=None)
def _register_neon(dotprod: bool) -> str:
    """Arm, 4 lanes of 128 bits. With the dot-product extension one ``sdot``; without (Cortex-A72),
    ``smull`` of the activations (4 bytes, repeated) by each half of the weights into 16-bit
    products (s8 x s8 fits), ``saddlp`` adding neighbours into 32 bits and ``addp`` the remaining
    pairs: 4 lanes x 4 products in 5 instructions besides the accumulate."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    s8, s32, local = "int8", "int32", "local"

    def intrinsic(name: str, dtype: str, *args):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{name}"), *args, dtype=dtype)

    @T.prim_func(s_tir=True)
    def sdot(a: T.Buffer((4,), s8, offset_factor=1), b: T.Buffer((4, 4), s8, offset_factor=1),
             c: T.Buffer((4,), s32, offset_factor=1, scope=local)) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            word = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 4)] = intrinsic("sdot.v4i32.v16i8", "int32x4", c.vload([0], dtype="int32x4"),
                                                   T.reinterpret(T.broadcast(word, 4), dtype="int8x16"),
                                                   b.vload([0, 0], dtype="int8x16"))

    @T.prim_func(s_tir=True)
    def smull(a: T.Buffer((4,), s8, offset_factor=1), b: T.Buffer((4, 4), s8, offset_factor=1),
              c: T.Buffer((4,), s32, offset_factor=1, scope=local)) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            word = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            twice = T.reinterpret(T.broadcast(word, 2), dtype="int8x8")
            weights = b.vload([0, 0], dtype="int8x16")
            low = intrinsic("saddlp.v4i32.v8i16", "int32x4",
                            intrinsic("smull.v8i16", "int16x8", twice, T.vectorlow(weights, dtype="int8x8")))
            high = intrinsic("saddlp.v4i32.v8i16", "int32x4",
                             intrinsic("smull.v8i16", "int16x8", twice, T.vectorhigh(weights, dtype="int8x8")))
            c[T.ramp(T.int32(0), 1, 4)] = c.vload([0], dtype="int32x4") + intrinsic("addp.v4i32", "int32x4", low, high)

    name = "hwc_sdot_4x4_local" if dotprod else "hwc_smull_saddlp_4x4_local"
    TensorIntrin.register(name, _dot_description(4, s8), sdot if dotprod else smull)
    return name


def schedule_int8_conv2d_nhwc(func: tirx.PrimFunc, intrinsics: dict[int, str], registers: int) -> tirx.PrimFunc | None:
    """``func`` with its int8 NHWC conv on the dot-product instruction, or None where it does not apply."""
    sch = Schedule(func)
    try:
        conv = sch.get_sblock("conv2d_nhwc")
    except Exception:  # no dense NHWC conv in this function
        return None
    if not _is_int8_hwio(sch, conv):
        return None
    out_shape = [int(x) for x in sch.get(conv).writes[0].source.shape]
    tiles = choose_tiles(out_shape[2], out_shape[3], VectorUnit(max(intrinsics), registers))
    if tiles is None or tiles.lanes not in intrinsics:
        return None
    try:
        _schedule(sch, conv, tiles, intrinsics[tiles.lanes])
    except (ScheduleError, _NotApplicable, tvm.error.InternalError):
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _is_int8_hwio(sch: Schedule, conv) -> bool:
    block = sch.get(conv)
    if len(block.iter_vars) != 7 or len(sch.get_loops(conv)) != 7 or len(block.reads) != 2:
        return False
    if [iv.iter_type for iv in block.iter_vars] != [0, 0, 0, 0, 2, 2, 2]:
        return False
    data, weight = (region.source for region in block.reads)
    out = block.writes[0].source
    if data.dtype not in ("uint8", "int8") or (weight.dtype, out.dtype) != ("int8", "int32") or len(weight.shape) != 4:
        return False
    in_channels, out_channels = int(data.shape[3]), int(out.shape[3])
    return (int(weight.shape[2]) == in_channels and int(weight.shape[3]) == out_channels
            and in_channels % GROUP == 0)


def _schedule(sch: Schedule, conv, tiles, intrinsic: str, keep=(), per_pixel_tile=None) -> None:
    """As ``cpu_schedules._schedule`` (``keep``, ``per_pixel_tile``: stages computed inside each
    pixel tile), with the dot product for the FMA."""
    epilogue = fuse_epilogue(sch, conv, keep)
    lanes = tiles.lanes
    _pack_weights(sch, conv, tiles.channels, lanes)
    n, h, w, o, rh, rw, rc = sch.get_loops(conv)
    w_outer, w_inner = sch.split(w, [None, tiles.width])
    o_outer, o_vectors, o_lanes = sch.split(o, [None, tiles.vectors, lanes])
    rc_outer, rc_inner = sch.split(rc, [None, GROUP])
    inside = []
    if per_pixel_tile is not None:
        parallel, inside = [n, h, w_outer], [o_outer]
    else:
        parallel = [n, o_outer, h, w_outer] if _weights_outweigh_input(sch, conv) else [n, h, w_outer, o_outer]
    sch.reorder(*parallel, *inside, rh, rw, rc_outer, w_inner, o_vectors, o_lanes, rc_inner)
    store = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(store, (parallel + inside)[-1])
    if epilogue is not None:
        sch.reverse_compute_inline(epilogue)
    pixel_tiles = sch.fuse(*parallel)
    sch.parallel(pixel_tiles)
    tile_loop = inside[-1] if inside else pixel_tiles
    store_tile(sch, store, tile_loop, lanes)
    for producer in sch.get_producers(conv):  # the padding (with the input's zero point)
        _schedule_input(sch, producer, lanes, depthwise=False)
    init_tile(sch, sch.decompose_reduction(conv, rh), tile_loop)
    sch.tensorize(o_lanes, intrinsic)
    sch.unroll(o_vectors)
    sch.unroll(w_inner)
    if per_pixel_tile is not None:  # after the tensorize, which matches the input buffer as a parameter's
        per_pixel_tile(sch, pixel_tiles)


def _pack_weights(sch: Schedule, conv, channels: int, lanes: int) -> None:
    """HWIO weights to ``[O/tile][KH][KW][I/4][tile/lanes][lanes][4]``: each vpdpbusd reads one
    contiguous row (16 or 8 output channels x 4 input channels), and a tile's filters are
    contiguous; folded into the constant at compile time like the float kernel's repacking."""
    packed = sch.cache_read(conv, 1, "global")
    if channels == lanes:  # one vector per tile: no vector index (a constant 0 breaks the layout map)
        layout = lambda kh, kw, i, o: (o // lanes, kh, kw, i // GROUP, o % lanes, i % GROUP)  # noqa: E731
    else:
        layout = lambda kh, kw, i, o: (o // channels, kh, kw, i // GROUP,  # noqa: E731
                                       (o % channels) // lanes, o % lanes, i % GROUP)
    sch.transform_layout(conv, ("read", 1), layout)
    sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
