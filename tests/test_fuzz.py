"""Seeded mutations of the MNIST model through inspect, fold and compile: no signal, no traceback,
exit codes 0 or 2 only, every bad input one line, and every exit-0 output checked against ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import shared_model

from hwcompress.model.reference import random_inputs, relative_error, run

MUTATIONS = 10

# One process per mutated model runs the three commands in turn (TVM imported once); a native
# crash kills that process with a signal, which the test sees.
DRIVER = r"""
import contextlib, io, json, sys
from hwcompress.cli import main
model, out = sys.argv[1], sys.argv[2]
for name, argv in [("inspect", ["inspect", model]), ("fold", ["fold", model, "-o", out + "/folded.onnx"]),
                   ("compile", ["compile", model, "-o", out + "/compiled", "--tune-trials", "0", "--repeat", "2",
                                "--cache-dir", out + "/cache"])]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv + ["--quiet"])
    print(json.dumps({"command": name, "code": code, "stderr": err.getvalue()}), flush=True)
"""


def _mutate(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random change of the kinds a corrupt or hand-edited file has."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kind = rng.choice(["attribute", "input", "initializer_shape", "initializer_nan", "op_type", "drop_node",
                       "input_shape", "truncate", "flip_bytes", "opset"])
    nodes = list(m.graph.node)
    node = nodes[rng.integers(len(nodes))]
    if kind == "attribute" and node.attribute:
        attribute = node.attribute[rng.integers(len(node.attribute))]
        value = int(rng.choice([0, -1, -7, 3, 1 << 20]))
        if attribute.ints:
            attribute.ints[rng.integers(len(attribute.ints))] = value
        elif attribute.type == onnx.AttributeProto.INT:
            attribute.i = value
    elif kind == "input" and node.input:
        node.input[rng.integers(len(node.input))] = "no_such_tensor"
    elif kind in ("initializer_shape", "initializer_nan"):
        tensor = m.graph.initializer[rng.integers(len(m.graph.initializer))]
        array = numpy_helper.to_array(tensor).copy()
        if kind == "initializer_shape":
            array = array.reshape(-1)[: max(1, array.size // 2)]
        elif np.issubdtype(array.dtype, np.floating):
            array.flat[rng.integers(array.size)] = rng.choice([np.nan, np.inf, 1e38])
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    elif kind == "op_type":
        node.op_type = str(rng.choice(["Relu", "Sigmoid", "MaxPool", "Gemm", "NoSuchOp", "Add"]))
    elif kind == "drop_node":
        m.graph.node.remove(node)
    elif kind == "input_shape":
        dim = m.graph.input[0].type.tensor_type.shape.dim[rng.integers(4)]
        dim.Clear()
        choice = rng.choice(["zero", "symbolic", "big"])
        if choice == "symbolic":
            dim.dim_param = "N"
        else:
            dim.dim_value = 0 if choice == "zero" else 4096
    elif kind == "opset":
        m.opset_import[0].version = int(rng.choice([1, 6, 30]))
    data = m.SerializeToString()
    if kind == "truncate":
        data = data[: rng.integers(16, len(data))]
    elif kind == "flip_bytes":
        data = bytearray(data)
        for i in rng.integers(0, len(data), 8):
            data[i] = rng.integers(256)
        data = bytes(data)
    return str(kind), data


def _declare_inputs_as(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """An input dim declared 0 or symbolic is taken as exporters mean it (unknown; a batch becomes
    1), where ONNX Runtime holds the file to a literal 0: the mutated graph is run with its inputs
    declared as hwc compiled them."""
    shapes = {v.name: v.type.tensor_type.shape for v in folded.graph.input}
    for v in model.graph.input:
        if v.name in shapes:
            v.type.tensor_type.shape.CopyFrom(shapes[v.name])


def _run(path: Path, out: Path) -> subprocess.CompletedProcess:
    out.mkdir()
    return subprocess.run([sys.executable, "-c", DRIVER, str(path), str(out)], capture_output=True, text=True,
                          timeout=600)


def test_mutated_models_end_in_one_line_or_a_checked_result(tmp_path):
    original = onnx.load(str(shared_model("mnist-8")))
    rng = np.random.default_rng(20261129)
    cases = []
    for index in range(MUTATIONS):
        kind, data = _mutate(original, rng)
        path = tmp_path / f"m{index}.onnx"
        path.write_bytes(data)
        cases.append((index, kind, path))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: _run(case[2], tmp_path / f"out{case[0]}"), cases))
    counts = {0: 0, 2: 0}
    for (index, kind, path), result in zip(cases, results):
        where = f"mutation {index} ({kind})"
        assert result.returncode == 0, f"{where}: the process died (rc {result.returncode}): {result.stderr[-2000:]}"
        assert "Traceback" not in result.stdout + result.stderr, f"{where}: {result.stderr[-2000:]}"
        for line in result.stdout.splitlines():
            step = json.loads(line)
            assert step["code"] in (0, 2), f"{where}: {step}"
            counts[step["code"]] += 1
            own = [l for l in step["stderr"].splitlines() if l.startswith("hwc: error:")]
            if step["code"] == 2:
                assert len(own) == 1, f"{where}: {step}"
                continue
            out = tmp_path / f"out{index}"
            if step["command"] == "fold":
                mutated, folded = onnx.load(str(path)), onnx.load(str(out / "folded.onnx"))
                _declare_inputs_as(mutated, folded)
                feeds = random_inputs(folded, seed=1)
                assert relative_error(run(mutated, feeds), run(folded, feeds)) < 1e-3, where
            if step["command"] == "compile":
                report = json.loads((out / "compiled" / "report.json").read_text())
                accuracy = report["accuracy"]
                assert accuracy["max_relative_error"] is not None and \
                    accuracy["max_relative_error"] <= accuracy["tolerance"], f"{where}: {accuracy}"
    assert counts[0] and counts[2], counts  # the mutations reach both outcomes
