"""A concat written in place: each kernel that makes one of its inputs writes its slice of the output.

A concat kernel reads back everything its producers have just written and writes it all again, at
memory bandwidth: SqueezeNet's fire modules join a 1x1 and a 3x3 conv (55x55x64 each), and its
four concat kernels took about 9% of the untuned model's per-kernel profile. Here a producer that
only the concat reads writes straight into the concat's output at its offset along the concat
axis: the first one by ``call_tir`` (which allocates the whole output), each later one by
``call_tir_inplace`` on the tensor so far, in the order they ran. An input no such kernel makes
(a parameter, a tensor read elsewhere too, a kernel left to MetaSchedule) is copied in by a small
in-place kernel. A producer keeps its schedule: only its output buffer and the indices on the
concat axis change.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.s_tir import Schedule

from .cpu_schedules import is_scheduled
from .relax_rewrite import is_call_tir, rewrite_blocks

_CONCAT_BLOCK = "T_concat"  # the block TVM's legalized concatenate computes


def concat_in_place(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` (fused kernels) with every concat kernel that has at least one input made by a
    kernel read by nothing else replaced by its producers writing into one output."""
    made: dict = {}  # (kernel, output shape, axis, offset) -> the rewritten kernel's GlobalVar
    # CanonicalizeBindings first: an alias between a producer and its concat would hide it.
    return rewrite_blocks(relax.transform.CanonicalizeBindings()(mod),
                          lambda builder, block, uses: _in_block(builder, block, uses, made))


def _in_block(builder, block, uses, made):
    """``block`` with its concats written in place (``block`` itself where none is)."""
    mod = builder.get()
    bindings = list(block.bindings)
    index = {b.var: i for i, b in enumerate(bindings)}
    replaced: dict[int, list] = {}  # binding index -> the bindings in its place
    for at, binding in enumerate(bindings):
        call = binding.value
        if not is_call_tir(call) or not isinstance(mod[call.args[0]], tirx.PrimFunc):
            continue
        axis = _concat_axis(mod[call.args[0]])
        if axis is None or any(not isinstance(a, relax.Var) for a in call.args[1].fields):
            continue
        out_ty = call.ty_args[0]
        parts, offset = [], 0  # (input, offset, producing binding's index or None, kernel writing it in)
        for arg in call.args[1].fields:
            producer = index.get(arg)
            writer = None
            if producer is not None and producer not in replaced and _writes_only_for(bindings[producer].value, arg, uses, mod):
                writer = _writing_into(builder, bindings[producer].value.args[0], out_ty, axis, offset, made)
            parts.append((arg, offset, producer if writer is not None else None, writer))
            offset += int(arg.ty.shape[axis])
        if all(writer is None for *_, writer in parts):
            continue
        full = None  # the output so far
        writers = sorted((p for p in parts if p[2] is not None), key=lambda p: p[2]) + [p for p in parts if p[2] is None]
        for n, (arg, offset, producer, writer) in enumerate(writers):
            last = n == len(writers) - 1
            var = binding.var if last else relax.DataflowVar(f"{arg.name}_in_concat", out_ty) \
                if isinstance(block, relax.DataflowBlock) else relax.Var(f"{arg.name}_in_concat", out_ty)
            if producer is not None:
                inputs = list(bindings[producer].value.args[1].fields)
            else:
                inputs = [arg]
                writer = _writing_into(builder, _copy_kernel(builder, arg, made), out_ty, axis, offset, made)
            value = (relax.call_tir(writer, relax.Tuple(inputs), out_ty) if full is None else
                     relax.call_tir_inplace(writer, relax.Tuple(inputs + [full]), len(inputs), out_ty))
            site = producer if producer is not None else at
            replaced.setdefault(site, []).append(relax.VarBinding(var, value))
            full = var
        replaced.setdefault(at, [])  # the concat itself goes (the last writer binds its variable)
    if not replaced:
        return block
    new = [b for i, old in enumerate(bindings) for b in (replaced[i] if i in replaced else [old])]
    return relax.DataflowBlock(new) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(new)


def _writes_only_for(value, arg, uses, mod) -> bool:
    """Whether ``value`` (bound to ``arg``) is a call of a scheduled kernel with one tensor output
    that nothing but the concat reads. Kernels not yet scheduled are left whole: the default
    schedule did not vectorize YOLO's SPP max pools once their output indices were offset (0.02
    -> 0.41 ms), and the model ran 1.15x slower."""
    return (is_call_tir(value) and uses.get(arg) == 1 and isinstance(value.ty_args[0], relax.TensorType)
            and is_scheduled(mod[value.args[0]]))


def _concat_axis(func: tirx.PrimFunc) -> int | None:
    """The axis ``func`` concatenates along, where it is an unscheduled concat kernel."""
    if is_scheduled(func) or len(func.params) < 3:
        return None
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1 or sch.get(blocks[0]).name_hint != _CONCAT_BLOCK:
        return None
    shapes = [[int(d) for d in p.ty.shape] for p in func.params]
    *inputs, out = shapes
    differ = {i for shape in inputs for i, (a, b) in enumerate(zip(shape, out)) if a != b}
    if len(differ) != 1 or any(len(s) != len(out) for s in inputs):
        return None
    (axis,) = differ
    return axis if sum(s[axis] for s in inputs) == out[axis] else None


def _writing_into(builder, kernel, out_ty, axis: int, offset: int, made) -> relax.GlobalVar | None:
    """``kernel`` (its last parameter its output) writing instead into a tensor of ``out_ty``'s
    shape, at ``offset`` along ``axis``: the output tensor becomes its last parameter. None where
    the kernel uses its output other than by loads, stores and regions of it."""
    key = (kernel, tuple(int(d) for d in out_ty.shape), axis, offset)
    if key in made:
        return made[key]
    func = builder.get()[kernel]
    out = func.params[-1]
    shape = [tirx.IntImm(str(d.ty), int(v)) for d, v in zip(out.ty.shape, out_ty.shape)]
    full = tirx.decl_buffer(shape, out.ty.dtype, out.name)

    def shifted(indices):
        indices = list(indices)
        indices[axis] = indices[axis] + offset
        return indices

    def store(node):
        return tirx.BufferStore(full, node.value, shifted(node.indices)) if node.buffer.same_as(out) else node

    def load(node):
        return tirx.BufferLoad(full, shifted(node.indices)) if node.source.same_as(out) else node

    def region(node):
        if not node.source.same_as(out):
            return node
        ranges = list(node.region)
        ranges[axis] = tvm.ir.Range.from_min_extent(ranges[axis].min + offset, ranges[axis].extent)
        return tirx.BufferRegion(full, ranges)

    body = tvm_ffi.structural_map(func.body, [(tirx.stmt.BufferStore, store), (tvm.ir.TensorLoad, load),
                                              (tvm.ir.TensorRegion, region)])
    if _mentions(body, out):  # the output used some other way (a pointer to it): not moved
        made[key] = None
        return None
    rewritten = tirx.PrimFunc(list(func.params[:-1]) + [full], body, attrs=func.attrs)
    made[key] = builder.add_func(rewritten, f"{kernel.name_hint}_into_concat")
    return made[key]


def _mentions(node, var) -> bool:
    found = []
    tvm_ffi.structural_walk(node, [(type(var), lambda v: found.append(v) if v.same_as(var) else None)])
    return bool(found)


def _copy_kernel(builder, arg, made) -> relax.GlobalVar:
    """A kernel copying a tensor of ``arg``'s type (its output then moved into the concat)."""
    shape, dtype = [int(d) for d in arg.ty.shape], arg.ty.dtype
    key = ("copy", tuple(shape), dtype)
    if key not in made:
        from tvm import te

        source = te.placeholder(shape, dtype, "source")
        copy = te.compute(shape, lambda *i: source(*i), name="T_copy")
        func = te.create_prim_func([source, copy]).without_attr("global_symbol").with_attr("op_pattern", 2)
        made[key] = builder.add_func(func, "copy")
    return made[key]
