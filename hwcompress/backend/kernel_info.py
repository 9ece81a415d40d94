"""What each fused kernel of a built model computes, in words, for the per-kernel time table.

A kernel's name (``fused_conv2d3_cast8_multiply4_add3_tir_round3_...``) says which Relax ops
were fused into it, in order; the Relax function that calls it says the shapes it reads and
writes; the TIR says which conv it is (dense, depthwise, grouped) and whether it runs on the
project's register-blocked schedule. Together they give a profile a user can read, as trtexec's
per-layer profile does: op, shapes, fused epilogue.
"""

from __future__ import annotations

import re

# Relax ops that define a kernel (the rest are its prologue or epilogue), most specific first.
_MAIN_OPS = ("conv2d_transpose", "conv2d_winograd", "conv2d", "matmul", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
             "mean", "sum", "softmax", "resize2d", "concatenate", "split", "strided_slice", "take",
             "transpose", "reshape", "layout_transform", "pad")
# Op names that contain underscores, so that a kernel name can be split into ops.
_COMPOUND = ("adaptive_avg_pool2d", "conv2d_transpose", "conv2d_winograd", "max_pool2d", "avg_pool2d", "strided_slice",
             "layout_transform", "broadcast_to", "expand_dims", "image_resize2d")
_INTO_CONCAT = "_into_concat"
# Shorter words for the epilogue column.
_WORDS = {"maximum": "max", "minimum": "min", "multiply": "mul", "subtract": "sub",
          "divide": "div"}


def _unnumbered(token: str) -> str:
    """``cast10`` -> ``cast``, ``conv2d3`` -> ``conv2d``, ``pool2d1`` -> ``pool2d``."""
    dimensioned = re.match(r"^(.*\dd)\d*$", token)
    return dimensioned.group(1) if dimensioned else re.sub(r"\d+$", "", token)


def fused_ops(kernel: str) -> list[str]:
    """The Relax ops fused into ``kernel``, from its name, in order (TVM numbers repeated ops:
    ``conv2d3``, ``cast10``; the numbering is dropped)."""
    into_concat = kernel.endswith(_INTO_CONCAT)  # concat_in_place's kernels write their concat's slice
    name = re.sub(r"_prepacked$", "", re.sub(r"^fused_", "", kernel.removesuffix(_INTO_CONCAT)))
    tokens = [_unnumbered(t) for t in name.split("_") if t] + (["concat in place"] if into_concat else [])
    ops, i = [], 0
    while i < len(tokens):
        if tokens[i] == "tir" and i + 1 < len(tokens):  # TIR intrinsics: tir_round, tir_sigmoid
            ops.append("tir_" + tokens[i + 1])
            i += 2
            continue
        for compound in _COMPOUND:
            parts = compound.split("_")
            if tokens[i:i + len(parts)] == parts:
                ops.append(compound)
                i += len(parts)
                break
        else:
            ops.append(tokens[i])
            i += 1
    return ops


def describe_kernels(mod) -> dict[str, dict]:
    """Kernel name -> {op, inputs, output, fused, schedule} for every TIR kernel ``mod``'s Relax
    functions call (``mod``: the lowered kernels ``build.lower`` returns)."""
    from tvm import relax, tirx

    from .cpu_schedules import is_scheduled
    from .dense_as_conv import static_shape

    calls: dict[str, tuple[list, list | None]] = {}
    call_tir = {"relax.call_tir", "relax.call_tir_inplace"}
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for binding in (b for block in getattr(func.body, "blocks", []) for b in block.bindings):
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") in call_tir:
                callee, args = value.args[0], list(getattr(value.args[1], "fields", []))
                written = {int(i) for i in getattr(value.attrs, "inplace_indices", None) or []}  # outputs, not inputs
                inputs = [s for s in (static_shape(a) for i, a in enumerate(args) if i not in written) if s is not None]
                calls.setdefault(callee.name_hint, (inputs, _first_output_shape(binding.var)))
    described = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        ops = fused_ops(name)
        main = next((op for wanted in _MAIN_OPS for op in ops if op == wanted), ops[0] if ops else name)
        inputs, output = calls.get(name, ([], None))
        op = _conv_kind(func, inputs, output) if main == "conv2d" else main
        at = ops.index(main) if main in ops else 0
        schedule = "hwc register-blocked" if is_scheduled(func) else "MetaSchedule / default"
        schedule = str(func.attrs.get("hwc.schedule", schedule)) if func.attrs is not None else schedule
        if main == "conv2d_winograd":
            from .winograd import tile_size

            m = tile_size(inputs[1][1]) if len(inputs) > 1 and len(inputs[1]) == 4 else "m"
            op, schedule = "conv2d", f"hwc Winograd F({m}x{m}, 3x3)"
        described[name] = {
            "op": op,
            "inputs": inputs,
            "output": output,
            "fused": [_WORDS.get(o, o.removeprefix("tir_")) for o in ops[:at] + ops[at + 1:]],
            "schedule": schedule,
        }
    return described


def _first_output_shape(var) -> list[int] | None:
    """The static shape ``var`` holds, or where it holds several outputs (a recurrent layer's
    sequence and states) the first one's; None where it is not static."""
    from .dense_as_conv import type_shape

    fields = getattr(var.ty, "fields", None)
    return type_shape(fields[0] if fields else var.ty)


def _conv_kind(func, inputs: list, output: list | None) -> str:
    """conv2d, depthwise conv2d or grouped conv2d: TOPI names the block of both grouped kinds
    ``group_conv2d_*``; depthwise is the one whose HWIO weights have one input channel per output.
    A kernel with a grouped and a dense block is a depthwise conv merged with its 1x1 reader."""
    from tvm.tirx import stmt as S

    names = set()

    def walk(node):
        if node is None:
            return
        block = getattr(node, "block", None)  # a block realize
        if block is not None:
            names.add(block.name_hint)
            walk(block.body)
            return
        if isinstance(node, S.SeqStmt):
            for child in node.seq:
                walk(child)
        elif isinstance(node, S.IfThenElse):
            walk(node.then_case)
            walk(node.else_case)
        else:
            walk(getattr(node, "body", None))

    walk(func.body)
    if any(n.startswith("group_conv2d") for n in names) and any(n.startswith("conv2d_nhwc") for n in names):
        return "depthwise conv2d + 1x1 conv2d"  # depthwise_pointwise's merged kernel
    if not any(n.startswith("group_conv2d") for n in names):
        return "conv2d"
    channels = output[-1] if output else None
    # HWIO weights [kh, kw, 1, C] (not a bias broadcast as [1, 1, 1, C])
    if any(len(s) == 4 and s[2] == 1 and s[3] == channels and (s[0], s[1]) != (1, 1) for s in inputs):
        return "depthwise conv2d"
    return "grouped conv2d"
