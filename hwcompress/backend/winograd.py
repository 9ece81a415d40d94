"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4: 2.25x or 4x fewer
multiplications.

A direct 3x3 conv on a CPU is bound by its multiply-adds: the register-blocked kernel
(``cpu_schedules``) runs at the FMA units' peak, and so does ONNX Runtime's, which has no
Winograd path for float32 on x86. Winograd (Lavin and Gray 2016) computes each m x m output tile
from an alpha x alpha input tile (alpha = m + 2) as ``A^T [(G g G^T) . (B^T d B)] A``: per tile
and channel pair alpha^2 multiply-adds (16 for F2, 36 for F4) instead of 9 m^2 (36, 144). The
weight transform ``U = G g G^T`` is done here once, at compile time, on the constant weights; the
kernel has these stages:

- ``winograd_pad``: a padded copy of the input covering whole tiles;
- ``winograd_input_rows`` / ``winograd_input``: ``V = B^T d B`` for every tile, rows then columns;
- ``winograd_gemm``: alpha^2 independent matrix products ``M[e] = V[e] @ U[e]`` over input
  channels, register-blocked like the direct conv (tiles x output-channel vectors in registers);
- ``winograd_output_columns`` / ``winograd_output``: ``Y = A^T M A`` for each output tile, then
  the fused epilogue (bias, activations, residual) in registers, as the direct conv does.

The products and the output transform run per block of tiles and channels on one core, so a
block's products stay in that core's cache; the input transform is one parallel pass.
``rewrite_winograd_convs`` replaces eligible ``relax.nn.conv2d`` calls (NHWC, HWIO, 3x3, stride
1, one group, float32, constant weights, at least ``MIN_INPUT_CHANNELS``) before fusion, so the
epilogue fuses as with the direct conv. A dilated one (DeepLab's and dilated ResNets' 3x3 convs)
is d x d undilated convs, one per phase of the output grid (``_dilated_by_phases``), computed
as one Winograd conv over a batch of the input's phases. Exact in real arithmetic; in float32 it
differs from the direct sum by rounding (relative error ~1e-6 for F2, ~1e-5 for F4, checked
against ONNX Runtime in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir.schedule import Schedule

OUTPUT_BLOCK = "winograd_output"
GEMM_BLOCK = "winograd_gemm"
INPUT_BLOCK = "winograd_input"
PAD_BLOCK = "winograd_pad"
ROWS_BLOCK = "winograd_input_rows"
COLUMNS_BLOCK = "winograd_output_columns"


@dataclass(frozen=True)
class Transform:
    """F(m x m, 3x3): ``Y = AT [(G g G^T) . (BT d BT^T)] AT^T`` on (m + 2)-square input tiles."""

    m: int
    at: np.ndarray   # [m, alpha]
    bt: np.ndarray   # [alpha, alpha]
    g: np.ndarray    # [alpha, 3]

    @property
    def alpha(self) -> int:
        return self.m + 2


# Lavin and Gray (2016): F(2x2, 3x3) on the points 0, 1, -1, infinity; F(4x4, 3x3) on 0, 1, -1,
# 2, -2, infinity (4x fewer multiplications, more additions in the transforms, larger rounding).
TRANSFORMS = {
    2: Transform(2, np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
                 np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
                 np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)),
    4: Transform(4, np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                             dtype=np.float64),
                 np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                           [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
                 np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                           [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)),
}


def transform_weights(weight_hwio: np.ndarray, channel_tile: int, m: int = 2) -> np.ndarray:
    """``G g G^T`` per (input, output) channel pair, laid out as the product reads it:
    ``[O / tile][alpha^2][I][tile]`` (each channel tile's matrices contiguous)."""
    t = TRANSFORMS[m]
    kh, kw, ci, co = weight_hwio.shape
    u = np.einsum("ak,klio,bl->abio", t.g, weight_hwio.astype(np.float64), t.g)  # [alpha, alpha, I, O]
    u = u.reshape(t.alpha * t.alpha, ci, co // channel_tile, channel_tile).transpose(2, 0, 1, 3)
    return np.ascontiguousarray(u.astype(np.float32))


def _linear(coefficients, values):
    """``sum(c * v)`` over the non-zero coefficients, with +-1 as plain additions."""
    total = None
    for c, v in zip(coefficients, values):
        if c == 0:
            continue
        term = v if c == 1 else (-v if c == -1 else v * tirx.const(float(c), "float32"))
        total = term if total is None else total + term
    return total if total is not None else tirx.const(0.0, "float32")


def _select(index, cases):
    """``cases[index]`` for a loop variable that the schedule unrolls (the selects then fold)."""
    expr = cases[-1]
    for k in range(len(cases) - 2, -1, -1):
        expr = tirx.Select(index == k, cases[k], expr)
    return expr


def _int64(*dims):
    """Shapes as Relax writes them (int64), so that the kernel's buffers match its call's tensors."""
    return tuple(tirx.IntImm("int64", int(d)) for d in dims)


def winograd_conv2d_nhwc(shape, out_channels: int, pads, channel_tile: int, m: int = 2):
    """The TE stages of a 3x3 stride-1 NHWC conv computed with F(m x m, 3x3): returns the input
    placeholder, the transformed-weight placeholder and the output tensor."""
    t = TRANSFORMS[m]
    alpha = t.alpha
    n, h, w, ci = shape
    top, left, bottom, right = pads
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    data = te.placeholder(_int64(n, h, w, ci), "float32", name="data")
    weight = te.placeholder(_int64(out_channels // channel_tile, alpha * alpha, ci, channel_tile), "float32",
                            name="winograd_weight")

    def pad(b, y, x, c):
        y, x = y - top, x - left
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[b, tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(x, w - 1), 0), c],
                                 tirx.const(0.0, "float32"))

    # A padded copy covering whole tiles: the transform then reads without border checks (with
    # them, its 36 cases of F4 took seconds to compile).
    padded = te.compute(_int64(n, tiles_h * m + 2, tiles_w * m + 2, ci), pad, name=PAD_BLOCK)

    # Both transforms are separable: rows first, then columns (F4's 36 values from 36 inputs take
    # 2 x 36 short sums instead of 36 sums of up to 16 terms, and compile in a fraction of the time).
    rows = te.compute(
        _int64(alpha, alpha, n, tiles_h, tiles_w, ci),
        lambda eps, j, b, ty, tx, c: _select(eps, [_linear(t.bt[r], [padded[b, ty * m + i, tx * m + j, c]
                                                                     for i in range(alpha)]) for r in range(alpha)]),
        name=ROWS_BLOCK)

    def input_transform(e, b, ty, tx, c):
        eps, nu = e // alpha, e % alpha
        return _select(nu, [_linear(t.bt[r], [rows[eps, j, b, ty, tx, c] for j in range(alpha)])
                            for r in range(alpha)])

    transformed = te.compute(_int64(alpha * alpha, n, tiles_h, tiles_w, ci), input_transform, name=INPUT_BLOCK)
    k = te.reduce_axis(_int64(0, ci), name="k")
    product = te.compute(
        _int64(alpha * alpha, n, tiles_h, tiles_w, out_channels),
        lambda e, b, ty, tx, o: te.sum(transformed[e, b, ty, tx, k]
                                       * weight[o // channel_tile, e, k, o % channel_tile], axis=k),
        name=GEMM_BLOCK)
    columns = te.compute(
        _int64(m, alpha, n, tiles_h, tiles_w, out_channels),
        lambda i, col, b, ty, tx, o: _select(i, [_linear(t.at[r], [product[a * alpha + col, b, ty, tx, o]
                                                                   for a in range(alpha)]) for r in range(m)]),
        name=COLUMNS_BLOCK)

    def output_transform(b, y, x, o):
        ty, tx, vy, vx = y // m, x // m, y % m, x % m
        return _select(vx, [_linear(t.at[r], [columns[vy, col, b, ty, tx, o] for col in range(alpha)])
                            for r in range(m)])

    out = te.compute(_int64(n, out_h, out_w, out_channels), output_transform, name=OUTPUT_BLOCK)
    return data, weight, out


# Below this many input channels the input transform (16 additions per tile and channel, and its
# 16 values per tile written and read back) costs more than the products save: measured on AMD
# Zen 4, 56x56 8->16 ran 1.56x the direct conv's time, 224x224 3->32 1.25x, 112x112 16->16 0.81x,
# 55x55 16->64 0.62x, 28x28 128->128 0.46x.
MIN_INPUT_CHANNELS = 16
KERNEL_NAME = "conv2d_winograd"
MIN_TILES_FOR_F4 = 16
MIN_STREAMED_TILES_FOR_F4 = 36


def choose_tile_size(out_shape, weights_cached: bool) -> int:
    """F(4x4, 3x3) where the map has enough tiles to reuse its transformed weights (36 per 9
    weights, each used once per tile), else F(2x2, 3x3) (16 per 9). Timed alone on AMD Zen 4
    (weights in cache), as a fraction of the direct conv's time, F2 / F4: 56x56 64->64 0.51 /
    0.35, 28x28 128->128 0.45 / 0.35, 13x13 64->256 0.53 / 0.42, 7x7 512->512 0.49 / 0.80. In a
    network whose weights do not stay in the cache between runs (ResNet-18: 45 MB) they stream
    from memory each time, and below about 36 tiles F4's four-fold weights cost more time than
    its products save (ResNet-18 with F4 down to 16 tiles: 0.68 of ONNX Runtime's time, F2
    everywhere 0.66, F4 from 36 tiles 0.62)."""
    tiles = -(-out_shape[1] // 4) * -(-out_shape[2] // 4)
    return 4 if tiles >= (MIN_TILES_FOR_F4 if weights_cached else MIN_STREAMED_TILES_FOR_F4) else 2


def rewrite_winograd_convs(mod: tvm.IRModule, unit, cache_bytes: int | None = None) -> tvm.IRModule:
    """Every eligible 3x3 conv of ``mod`` (NHWC/HWIO, after the layout conversion) as a call to
    its Winograd kernel, the weights transformed at compile time. ``cache_bytes``: the target's
    last-level cache, where known: a model whose weights, four-fold once transformed, fit in half
    of it keeps them there between runs."""
    from .relax_rewrite import rewrite_functions

    cached = cache_bytes is not None and 4 * _constant_bytes(mod) <= cache_bytes // 2
    return rewrite_functions(_WinogradConvs(mod, unit, cached), mod)


def _constant_bytes(mod: tvm.IRModule) -> int:
    """Bytes of the constants (weights) of ``mod``'s Relax functions."""
    sizes = []

    @relax.expr_functor.visitor
    class Constants(relax.PyExprVisitor):
        def visit_constant_(self, op):
            sizes.append(int(np.prod([int(d) for d in op.data.shape])) * tvm.DataType(str(op.data.dtype)).bits // 8)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            Constants().visit_expr(func)
    return sum(sizes)


@relax.expr_functor.mutator
class _WinogradConvs(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, unit, weights_cached: bool):
        super().__init__(mod)
        self.unit = unit
        self.weights_cached = weights_cached

    def visit_call_(self, call):
        from .dense_as_conv import static_shape
        from .relax_rewrite import dense_conv_weight

        call = self.visit_expr_post_order(call)
        weight = dense_conv_weight(self, call)
        if weight is None or [int(s) for s in call.attrs.strides] != [1, 1]:
            return call
        attrs = call.attrs
        shape = static_shape(call.args[0])
        if (shape is None or weight.dtype != np.float32 or weight.shape[:2] != (3, 3)
                or shape[3] < MIN_INPUT_CHANNELS or getattr(call.args[0].ty, "dtype", None) != "float32"):
            return call
        pads = tuple(int(p) for p in attrs.padding)
        dilation = tuple(int(d) for d in attrs.dilation)
        if dilation != (1, 1):
            rewritten = _dilated_by_phases(self, call.args[0], shape, weight, pads, dilation)
        else:
            rewritten = self.winograd(call.args[0], shape, weight, pads)
        return call if rewritten is None else rewritten

    def winograd(self, data, shape, weight, pads):
        """The call of a Winograd kernel computing this conv, or None where no register tile fits."""
        from .cpu_schedules import choose_tiles

        top, left, bottom, right = pads
        out_shape = [shape[0], shape[1] + top + bottom - 2, shape[2] + left + right - 2, weight.shape[3]]
        m = choose_tile_size(out_shape, self.weights_cached)
        tiles = choose_tiles(-(-out_shape[2] // m), out_shape[3], self.unit)
        if tiles is None:
            return None
        func = winograd_prim_func(shape, out_shape[3], pads, tiles.channels, m)
        kernel = self.builder_.add_func(func, KERNEL_NAME)
        return relax.call_tir(kernel, [data, relax.const(transform_weights(weight, tiles.channels, m))],
                              relax.TensorType(out_shape, "float32"))


# A phase's output below this many points (8x8) stays direct: too few tiles for the transforms and
# the two reorderings to pay. Between two 1x1 convs (AMD Zen 5, 2 threads), the block's time with
# phases / direct: 256 channels 28x28 dilation 2 (14x14 phases) 0.75, 16x16 d2 (8x8) 0.76, 32x32
# d4 (8x8) 0.80, 65x65 d2 0.63, 128 channels 64x64 d2 0.66; 33x33 d6 (6x6 phases) 1.15.
MIN_PHASE_OUTPUTS = 64


def _dilated_by_phases(rewriter: _WinogradConvs, data, shape, weight, pads, dilation):
    """A 3x3 conv dilated by (dh, dw) reads, for output row y, input rows y, y + dh, y + 2 dh of
    the padded input: rows of y's phase (y mod dh) only. So the padded input, cut into its dh x dw
    phases (row r of phase p: padded row dh r + p), is a batch of maps that one undilated conv
    turns into the output's phases, interleaved back afterwards; the two reorderings copy whole
    channel vectors (NHWC), and the epilogue fuses into the second. The padding is extended so that
    every phase has as many rows (columns); what that adds to the output is sliced off.
    None where a phase's output is too small (``MIN_PHASE_OUTPUTS``) or no register tile fits."""
    n, h, w, c = shape
    (top, left, bottom, right), (dh, dw) = pads, dilation
    out_h, out_w = h + top + bottom - 2 * dh, w + left + right - 2 * dw
    rows, cols = -(-out_h // dh), -(-out_w // dw)  # each phase's output
    if rows * cols < MIN_PHASE_OUTPUTS:
        return None
    emit = rewriter.builder_.emit
    padded = emit(relax.op.nn.pad(data, [0, 0, top, dh * (rows + 2) - h - top, left, dw * (cols + 2) - w - left, 0, 0]))
    split = emit(relax.op.reshape(padded, [n, rows + 2, dh, cols + 2, dw, c]))
    phases = emit(relax.op.reshape(emit(relax.op.permute_dims(split, [0, 2, 4, 1, 3, 5])),
                                   [n * dh * dw, rows + 2, cols + 2, c]))
    conv = rewriter.winograd(phases, (n * dh * dw, rows + 2, cols + 2, c), weight, (0, 0, 0, 0))
    if conv is None:
        return None
    out_channels = weight.shape[3]
    split = emit(relax.op.reshape(emit(conv), [n, dh, dw, rows, cols, out_channels]))
    joined = relax.op.reshape(emit(relax.op.permute_dims(split, [0, 3, 1, 4, 2, 5])),
                              [n, rows * dh, cols * dw, out_channels])
    if (rows * dh, cols * dw) != (out_h, out_w):
        joined = relax.op.strided_slice(emit(joined), axes=[1, 2], begin=[0, 0], end=[out_h, out_w])
    return joined


def winograd_prim_func(shape, out_channels: int, pads, channel_tile: int, m: int = 2) -> tirx.PrimFunc:
    """The conv as a PrimFunc that fuses like a conv (an epilogue of elementwise ops after it)."""
    data, weight, out = winograd_conv2d_nhwc(shape, out_channels, pads, channel_tile, m)
    func = te.create_prim_func([data, weight, out]).without_attr("global_symbol")
    return func.with_attr("op_pattern", 4)  # kOutEWiseFusable


def tile_size(products: int) -> int:
    """m of F(m x m, 3x3) from its number of products, (m + 2)^2."""
    return int(round(products ** 0.5)) - 2


def schedule_winograd(func: tirx.PrimFunc, unit) -> tirx.PrimFunc | None:
    """``func`` (a Winograd conv and what was fused after it) scheduled for ``unit``, the epilogue
    in the output tile's registers; where the epilogue cannot go there (it writes more than the
    conv's output), in passes of its own. None where ``func`` is not a Winograd conv."""
    from tvm.s_tir.schedule import ScheduleError

    from .cpu_schedules import _NotApplicable, has_block

    if not has_block(Schedule(func), GEMM_BLOCK):
        return None
    for fuse in (True, False):
        sch = Schedule(func)
        try:
            _schedule(sch, unit, fuse)
        except (ScheduleError, _NotApplicable, tvm.error.InternalError):  # TVM checks some cases only internally
            continue
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None


def _schedule(sch: Schedule, unit, fuse: bool) -> None:
    from .cpu_schedules import (_blocks_after, _schedule_elementwise, _weights_outweigh_input, choose_tiles,
                                fuse_epilogue, loops_below)

    out, columns, gemm, transformed, rows, pad = (sch.get_sblock(name) for name in (
        OUTPUT_BLOCK, COLUMNS_BLOCK, GEMM_BLOCK, INPUT_BLOCK, ROWS_BLOCK, PAD_BLOCK))
    products, _, _, tiles_w, channels = (int(d) for d in sch.get(gemm).writes[0].source.shape)
    m = tile_size(products)
    tiles = choose_tiles(tiles_w, channels, unit)  # as the weights were laid out for
    if fuse:
        epilogue = fuse_epilogue(sch, out, keep=(columns, gemm, transformed, rows, pad))
        if epilogue is not None:
            sch.reverse_compute_inline(epilogue)
    else:
        for block in _blocks_after(sch, out):
            _schedule_elementwise(sch, block, tiles.lanes)
    # Output: per block of tiles (one tile row, `tiles.width` tiles) and channels, on one core.
    b, y, x, o = sch.get_loops(out)
    ty, vy = sch.split(y, [None, m])
    tx, vx = sch.split(x, [None, m])
    tx_outer, tx_inner = sch.split(tx, [None, tiles.width])
    o_outer, o_vectors, o_lanes = sch.split(o, [None, tiles.vectors, tiles.lanes])
    # As in the direct conv, the operand re-read per block should be the smaller one: channel
    # blocks outermost where the transformed weights outweigh the transformed input.
    parallel = [o_outer, b, ty, tx_outer] if _weights_outweigh_input(sch, gemm) else [b, ty, tx_outer, o_outer]
    sch.reorder(*parallel, tx_inner, vy, vx, o_vectors, o_lanes)
    block_loop = sch.fuse(*parallel)
    sch.parallel(block_loop)
    sch.vectorize(o_lanes)
    for loop in (o_vectors, vx, vy):
        sch.unroll(loop)
    # The output transform's first (column) pass, per tile, in registers.
    sch.compute_at(columns, tx_inner)
    i, col, c_channels = sch.get_loops(columns)[-3:]
    c_vectors, c_lanes = sch.split(c_channels, [None, tiles.lanes])
    sch.vectorize(c_lanes)
    for loop in (c_vectors, col, i):
        sch.unroll(loop)
    # The products of that block, computed there: accumulators of `width` tiles x `vectors`
    # channel vectors in registers, the input channels streamed.
    sch.compute_at(gemm, block_loop)
    # Below the block loop: e, the block's tiles, channels, the reduction (loops of extent 1 --
    # batch, tile row, a one-tile block -- are not materialized).
    e, *g_tiles, g_channels, k = sch.get_loops(gemm)[1:]
    g_vectors, g_lanes = sch.split(g_channels, [tiles.vectors, tiles.lanes])
    sch.reorder(e, k, *g_tiles, g_vectors, g_lanes)
    accumulators = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(accumulators, e)
    sch.vectorize(g_lanes)
    sch.unroll(g_vectors)
    for loop in g_tiles:
        sch.unroll(loop)
    a_channels = sch.get_loops(accumulators)[-1]
    a_vectors, a_lanes = sch.split(a_channels, [None, tiles.lanes])
    sch.vectorize(a_lanes)
    sch.unroll(a_vectors)
    init = sch.decompose_reduction(gemm, k)
    sch.vectorize(sch.get_loops(init)[-1])
    _schedule_elementwise(sch, pad, tiles.lanes)
    # Input transform: one parallel pass over tile rows; per tile and vector of channels, the row
    # pass into registers, then the column pass, the cases unrolled.
    lanes = next(v for v in (unit.lanes, unit.lanes // 2, 4, 2, 1) if v and int(sch.get(
        sch.get_loops(transformed)[-1]).extent) % v == 0)
    e, b, ty, tx, c = sch.get_loops(transformed)
    c_outer, c_lanes = sch.split(c, [None, lanes])
    sch.reorder(b, ty, tx, c_outer, e, c_lanes)
    sch.parallel(sch.fuse(b, ty))
    sch.unroll(e)
    if lanes > 1:
        sch.vectorize(c_lanes)
    sch.compute_at(rows, c_outer)
    r_eps, r_j, *r_lanes = loops_below(sch, rows, c_outer)  # no lane loop where one channel a vector
    for loop in r_lanes:
        sch.vectorize(loop)
    sch.unroll(r_j)
    sch.unroll(r_eps)

