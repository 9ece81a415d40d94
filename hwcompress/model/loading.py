"""Load a user's ONNX file into the canonical form every pass expects, or refuse it clearly.

Canonical form: one opset (``CANONICAL_OPSET``), static input shapes, checked by ``onnx.checker``,
constants folded by onnxsim (its graph fusions are off: this project's passes own every rewrite so
that each is tested and reported), initializers not listed as graph inputs, shapes inferred.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from ..errors import HwcError, first_line
from .newer_ops import park, rewrite_newer_ops, unpark
from .qoperator import QOperatorError, qoperator_as_qdq, qoperator_ops
from .recurrent import RECURRENT_OPS, uncompilable_recurrent_nodes

CANONICAL_OPSET = 17
ASSUMED_BATCH = "hwc.batch_1_assumed"  # inputs whose dynamic batch was set to 1 (the report says so)
# onnx.ModelProto in memory, a deep copy per pass and onnxsim's own copy: several times the file.
_MEMORY_FACTOR = 4


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """Parse ``name=1x3x224x224`` options (the name may contain '='; the last one splits)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise HwcError(f"--input-shape {spec!r}: expected NAME=D1xD2x..., e.g. input=1x3x224x224")
        shapes[name] = [int(d) for d in dims.split("x")]
        if 0 in shapes[name]:
            raise HwcError(f"--input-shape {spec!r}: dimensions must be positive")
    return shapes


def load_model(path: str | os.PathLike, input_shapes: dict[str, list[int]] | None = None,
               require_supported: bool = True, simplify: bool = True) -> onnx.ModelProto:
    """Read, check and canonicalize an ONNX model; raise HwcError with one clear line on bad input."""
    path = Path(path)
    model = read_model(path)
    model = _as_exported_plainly(model)
    model = _fix_input_shapes(model, input_shapes or {}, path)
    _check_element_types(model, path)
    model = _convert_opset(rewrite_newer_ops(model), path)
    model = _qoperator_as_qdq(model, path)
    _check(model, path)
    if require_supported:
        check_supported_ops(model, path)
    if simplify:
        model = _simplify(model, path)
    return model


def read_model(path: Path) -> onnx.ModelProto:
    """Parse the file (and its external data) without changing it."""
    if not path.exists():
        raise HwcError(f"{path}: no such file")
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.exists():
            raise HwcError(f"{path}: is a directory without model.onnx")
        path = candidate
    _require_memory(path, path.stat().st_size)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise HwcError(f"{path}: not a valid ONNX file (corrupt or truncated: {first_line(exc)})") from exc
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise HwcError(f"{path}: not an ONNX model (no IR version or no graph nodes)")
    if not _text_fields_are_text(model):
        raise HwcError(f"{path}: not a valid ONNX file (corrupt: a name or op type is not UTF-8 text)")
    external = _external_files(model, path.parent)
    if external:
        _require_memory(path, path.stat().st_size + sum(f.stat().st_size for f in external if f.is_file()))
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise HwcError(f"{path}: cannot read its external weight data: {first_line(exc)}") from exc
    return model


def _text_fields_are_text(model: onnx.ModelProto) -> bool:
    """Protobuf hands back bytes for a string field that is not valid UTF-8 (a corrupt file)."""
    graph = model.graph
    names = [o.domain for o in model.opset_import]
    for node in graph.node:
        names += [node.op_type, node.domain, node.name, *node.input, *node.output]
        names += [a.name for a in node.attribute]
    names += [v.name for v in (*graph.input, *graph.output, *graph.value_info)]
    names += [t.name for t in graph.initializer]
    return all(isinstance(n, str) for n in names)


def dynamic_inputs(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs whose shape has a symbolic or unknown dimension, with their dims."""
    weights = {t.name for t in model.graph.initializer}
    found = {}
    for v in model.graph.input:
        if v.name in weights:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in v.type.tensor_type.shape.dim]
        if not v.type.tensor_type.HasField("shape") or any(isinstance(d, str) for d in dims):
            found[v.name] = dims
    return found


@functools.lru_cache(maxsize=1)
def supported_ops() -> frozenset[str]:
    """Ops of the default ONNX domain that TVM's Relax ONNX importer converts."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())


def unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes neither TVM's importer nor hwc's own conversions (recurrent layers) take."""
    ops = supported_ops() | RECURRENT_OPS
    return [n for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in ops]


def check_supported_ops(model: onnx.ModelProto, path: Path) -> None:
    bad = unsupported_nodes(model)
    if not bad:
        for node, why in uncompilable_recurrent_nodes(model):
            raise HwcError(f"{path}: {node.op_type} at node {node.name or '(unnamed)'} cannot be compiled: {why}")
        return
    first = bad[0]
    op = f"{first.domain}.{first.op_type}" if first.domain else first.op_type
    kinds = sorted({(f"{n.domain}." if n.domain else "") + n.op_type for n in bad})
    hint = ""
    if any(k.split(".")[-1].startswith(("QLinear", "QGemm", "ConvInteger")) for k in kinds):
        hint = (" (hwc imports these already-quantized ops: " + ", ".join(qoperator_ops())
                + "; for others give hwc the fp32 model)")
    raise HwcError(f"{path}: unsupported op {op} at node {first.name or '(unnamed)'}; "
                   f"{len(bad)} node(s) of {len(kinds)} unsupported kind(s): {', '.join(kinds)}{hint}")


def _as_exported_plainly(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo what exporters write differently (Paddle, older PyTorch): weights as ``Constant`` nodes
    become initializers, and stale shapes (``value_info`` and output dims holding -1 or symbols from
    before the inputs were fixed) are dropped, to be inferred again once the inputs are static."""
    graph = model.graph
    constants = [n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                 and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    del graph.value_info[:]
    for output in graph.output:
        for dim in output.type.tensor_type.shape.dim:  # unknown, not -1: inference fills them in
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
    return model


def _fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]], path: Path) -> onnx.ModelProto:
    weights = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in weights}
    for name in shapes:
        if name not in inputs:
            raise HwcError(f"--input-shape names {name!r}, but the model's inputs are: {', '.join(inputs)}")
    for name, dims in shapes.items():
        tensor_type = inputs[name].type.tensor_type
        old = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]
        if tensor_type.HasField("shape") and len(old) != len(dims):
            raise HwcError(f"--input-shape {name}: model input has rank {len(old)} {old}, got {len(dims)} dims")
        for want, have in zip(dims, old):
            if isinstance(have, int) and have > 0 and have != want:
                raise HwcError(f"--input-shape {name}: {dims} contradicts the model's fixed shape {old}")
        tensor_type.shape.Clear()
        for d in dims:
            tensor_type.shape.dim.add().dim_value = d
    dynamic = dynamic_inputs(model)
    assumed = []
    for name, dims in list(dynamic.items()):
        tensor_type = inputs[name].type.tensor_type
        if len(dims) > 1 and isinstance(dims[0], str) and all(isinstance(d, int) for d in dims[1:]):
            tensor_type.shape.dim[0].Clear()
            tensor_type.shape.dim[0].dim_value = 1  # only the batch is dynamic: compile for one sample
            assumed.append(name)
            del dynamic[name]
    if assumed:
        model.metadata_props.add(key=ASSUMED_BATCH, value=json.dumps(assumed))
    if dynamic:
        name, dims = next(iter(dynamic.items()))
        example = "x".join(str(d) if isinstance(d, int) else "1" for d in dims) or "1x3x224x224"
        raise HwcError(f"{path}: input {name!r} has a dynamic shape {dims}; "
                       f"give it a static one with --input-shape {name}={example}")
    return model


_NARROW_TYPES = {onnx.TensorProto.INT4: "INT4", onnx.TensorProto.UINT4: "UINT4",
                 onnx.TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN", onnx.TensorProto.FLOAT8E4M3FNUZ: "FLOAT8E4M3FNUZ",
                 onnx.TensorProto.FLOAT8E5M2: "FLOAT8E5M2", onnx.TensorProto.FLOAT8E5M2FNUZ: "FLOAT8E5M2FNUZ"}


def _check_element_types(model: onnx.ModelProto, path: Path) -> None:
    """4-bit and 8-bit float tensors, named, before the opset converter fails on them obscurely."""
    graph = model.graph
    types = [(t.name, t.data_type) for t in graph.initializer]
    types += [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output, *graph.value_info]]
    types += [(n.output[0], a.t.data_type) for n in graph.node for a in n.attribute if a.HasField("t")]
    for name, elem in types:
        if elem in _NARROW_TYPES:
            raise HwcError(f"{path}: tensor {name!r} is {_NARROW_TYPES[elem]}; hwc compiles float and 8-bit integer "
                           f"models (quantize the fp32 model with hwc quantize, or give it int8 QDQ)")


def _convert_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise HwcError(f"{path}: the model imports no version of the default ONNX op set")
    if version != CANONICAL_OPSET:
        try:
            model = unpark(version_converter.convert_version(park(model), CANONICAL_OPSET))
        except HwcError as exc:
            raise HwcError(f"{path}: {exc}") from exc
        except Exception as exc:  # the converter raises bare RuntimeErrors and C++ errors
            raise HwcError(f"{path}: cannot convert opset {version} to {CANONICAL_OPSET}: "
                           f"{first_line(exc)}") from exc
    model.ir_version = max(model.ir_version, 8)
    # Old models list initializers as graph inputs; newer IR versions need not, and passes assume not.
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def _qoperator_as_qdq(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        return qoperator_as_qdq(model)
    except QOperatorError as exc:
        raise HwcError(f"{path}: {exc}") from exc


def _check(model: onnx.ModelProto, path: Path) -> None:
    """The checker, then strict shape inference, which also checks attribute ranges (a MaxPool with
    stride 0 would otherwise reach onnxsim's native code and kill the process with SIGFPE)."""
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise HwcError(f"{path}: invalid ONNX model: {first_line(exc)}") from exc
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise HwcError(f"{path}: invalid ONNX model: shape inference failed: {first_line(exc)}") from exc
    _check_no_empty_tensors(inferred, path)


def _check_no_empty_tensors(inferred: onnx.ModelProto, path: Path) -> None:
    """A layer computing a tensor with no elements (an input too small for the kernels and pools
    before it): said here, with the layer, rather than as "Divide by zero" from TVM's build or
    "Invalid input shape" from ONNX Runtime."""
    producers = {out: node for node in inferred.graph.node for out in node.output}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    for v in (*inferred.graph.value_info, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim  # feature maps only: empty shape vectors are legitimate
        if v.name in producers and v.type.tensor_type.elem_type in floats and len(dims) >= 3 \
                and any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            node = producers[v.name]
            shape = "x".join(str(d.dim_value) if d.HasField("dim_value") else "?" for d in dims)
            raise HwcError(f"{path}: {node.op_type} node {node.name or '(unnamed)'} computes {v.name!r} with no "
                           f"elements (shape {shape}): the input is too small for the layers before it "
                           f"(give a larger --input-shape)")


def _simplify(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model, perform_optimization=False, check_n=0)
    except Exception as exc:  # onnxsim surfaces ORT and C++ errors of many types
        raise HwcError(f"{path}: constant folding (onnxsim) failed: {first_line(exc)}") from exc
    if not ok:
        raise HwcError(f"{path}: onnxsim could not validate the simplified model")
    try:
        return onnx.shape_inference.infer_shapes(simplified, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise HwcError(f"{path}: shape inference failed: {first_line(exc)}") from exc


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            files.add(base / location)
    return files


def _require_memory(path: Path, size: int) -> None:
    available = _available_memory()
    if available is not None and size * _MEMORY_FACTOR > available:
        raise HwcError(f"{path}: the model ({size / 2**30:.2f} GiB) needs about "
                       f"{size * _MEMORY_FACTOR / 2**30:.2f} GiB of memory to process; "
                       f"{available / 2**30:.2f} GiB is available")


def _available_memory() -> int | None:
    override = os.environ.get("HWC_MEMORY_LIMIT_BYTES")
    if override:
        return int(override)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
