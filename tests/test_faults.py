"""What a hostile user (or a power cut) does to hwc: nothing of the user's is lost, no native crash,
no wrong result accepted, every bad input one line and exit 2, an interrupt exit 130."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import hwc, make_model, shared_model

from hwcompress.backend.tuning_db import RECORDS, WORKLOADS, repair
from hwcompress.model.reference import relative_error, rms_error


def _one_line(result: subprocess.CompletedProcess, fragment: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "terminate" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hwc: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


@pytest.fixture
def small(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    path = tmp_path / "small.onnx"
    onnx.save(make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], {"w": rng.normal(0, 1, (4, 3, 3, 3))}),
              str(path))
    return path


# ---------------------------------------------------------------- outputs
def test_output_directory_holding_the_input_or_foreign_files_is_refused(tmp_path, small):
    folder = tmp_path / "work"
    folder.mkdir()
    mine = folder / "mine.onnx"
    mine.write_bytes(small.read_bytes())
    _one_line(hwc("compile", str(mine), "-o", str(folder), "--tune-trials", "0"), "holds the input")
    assert mine.read_bytes() == small.read_bytes()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    result = hwc("compile", str(small), "-o", str(notes), "--tune-trials", "0")
    _one_line(result, "holds files hwc did not write (todo.txt)")
    assert "loading" not in result.stderr, "refused before any work"
    assert (notes / "todo.txt").read_text() == "mine"
    # --force replaces a foreign one; hwc's own output is replaced by the next run.
    assert hwc("compile", str(small), "-o", str(notes), "--tune-trials", "0", "--repeat", "3", "-q", "--force").returncode == 0
    assert not (notes / "todo.txt").exists() and (notes / "model.so").exists()
    assert hwc("compile", str(small), "-o", str(notes), "--tune-trials", "0", "--repeat", "3", "-q").returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary siblings left"


def test_unwritable_or_wrong_kind_of_output_is_refused_before_work(tmp_path, small):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line(hwc("compile", str(small), "-o", str(afile), "--tune-trials", "0"), "is a file, not a directory")
    _one_line(hwc("compile", str(small), "-o", str(afile / "out"), "--tune-trials", "0"), "is a file")
    _one_line(hwc("compile", str(small), "-o", ".", "--tune-trials", "0", cwd=tmp_path), "current directory")
    _one_line(hwc("fold", str(small), "-o", str(small)), "is the input")
    _one_line(hwc("fold", str(small), "-o", str(tmp_path)), "is a directory")
    assert afile.read_text() == "x" and not list(tmp_path.glob(".*old*"))


def test_temporaries_of_a_killed_run_are_cleaned_by_the_next(tmp_path, small):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "model.so").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}.def456.tmp"  # a run still going: left alone
    live.mkdir()
    assert hwc("compile", str(small), "-o", str(tmp_path / "out"), "--tune-trials", "0", "--repeat", "3", "-q").returncode == 0
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- wrong results
def test_nan_is_a_mismatch_never_zero_error():
    ref = [np.array([1.0, 2.0, np.nan])]
    assert relative_error(ref, [np.array([1.0, 2.0, 3.0])]) == float("inf")
    assert relative_error([np.array([1.0, 2.0, 3.0])], [np.array([1.0, np.nan, 3.0])]) == float("inf")
    assert rms_error([np.array([1.0, 2.0])], [np.array([1.0, np.inf])]) == float("inf")
    assert relative_error(ref, [np.array([1.0, 2.0, np.nan])]) == 0.0  # NaN where the reference has NaN


def test_a_model_computing_nan_and_a_nan_tolerance_are_refused(tmp_path):
    model = onnx.load(str(shared_model("mnist-8")))
    for tensor in model.graph.initializer:
        if tensor.name == "Parameter5":  # the first conv's weights: NaN reaches every output
            weight = numpy_helper.to_array(tensor).copy()
            weight.flat[0] = np.nan
            tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    onnx.save(model, str(tmp_path / "nan.onnx"))
    _one_line(hwc("compile", str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "out"), "--tune-trials", "0"),
              "all NaN or infinite")
    assert not (tmp_path / "out").exists()
    _one_line(hwc("compile", str(shared_model("mnist-8")), "-o", str(tmp_path / "o2"), "--tolerance", "nan"),
              "not a finite number")


# ---------------------------------------------------------------- native faults
def test_attribute_out_of_range_is_refused_before_native_code(tmp_path):
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[0, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "stride0.onnx"))
    for command in (["fold", "-o", str(tmp_path / "f.onnx")], ["compile", "-o", str(tmp_path / "c")]):
        _one_line(hwc(command[0], str(tmp_path / "stride0.onnx"), *command[1:]), "strides must only contain positive")


def _one_node_compile_refused(tmp_path, node, shapes: tuple[list[int], list[int]], constant: tuple[str, np.ndarray],
                              opset: int, fragment: str) -> None:
    """``hwc compile`` of a model of one ``node`` (input ``x``, output ``y`` of ``shapes``, one
    constant input) ends with one line holding ``fragment``, exit 2, and no output directory."""
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])],
                              [numpy_helper.from_array(constant[1], constant[0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 9
    onnx.save(model, str(tmp_path / "one.onnx"))
    _one_line(hwc("compile", str(tmp_path / "one.onnx"), "--tune-trials", "0", "-o", str(tmp_path / "out")), fragment)
    assert not (tmp_path / "out").exists()


def test_a_gather_index_past_its_axis_is_refused_and_nothing_is_written(tmp_path):
    """A broken export's Gather index (3 on an axis of 3): one line with ONNX Runtime's reason, exit 2,
    no output directory. (That the Gather-as-Slice rewrite leaves such a Gather, not wrapping the
    index, is tested with the pass.)"""
    _one_node_compile_refused(tmp_path, helper.make_node("Gather", ["x", "i"], ["y"], axis=0), ([3, 4], [4]),
                              ("i", np.array(3, np.int64)), 17, "indices element out of data bounds")


def test_an_op_of_a_later_opset_without_an_opset_17_form_is_refused_and_nothing_is_written(tmp_path):
    """An opset-19 Pad in ``wrap`` mode (no opset-17 form; hwc canonicalizes to 17): one line naming
    the node and why, exit 2, no output directory."""
    _one_node_compile_refused(tmp_path, helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap", name="ring"),
                              ([1, 3, 8, 8], [1, 3, 8, 10]), ("pads", np.array([0, 0, 0, 1, 0, 0, 0, 1], np.int64)),
                              19, "Pad 'ring': mode 'wrap' (opset 19) has no opset-17 form")


@pytest.mark.parametrize("field, fragment", [
    ("{kind: llvm, mtriple: bogus-triple-xyz}", "cannot generate code for"),
    ("{kind: nosuchkind}", "unknown TVM target kind"),
    ("{kind: llvm, num-cores: -3}", "num-cores"),
])
def test_target_values_tvm_would_crash_on_are_refused(tmp_path, small, field, fragment):
    (tmp_path / "t.yaml").write_text(textwrap.dedent(f"""
        name: odd
        description: a target with a bad value
        tvm: {{target: {field}}}
        channel_multiple: 1
        dtypes: [float32]
        latency: {{method: local}}
        """))
    _one_line(hwc("compile", str(small), "--targets-dir", str(tmp_path), "--target", "odd", "-o",
                  str(tmp_path / "out"), "--tune-trials", "0"), fragment)


def test_interrupt_during_tuning_is_exit_130_and_the_database_stays_usable(tmp_path, small):
    cache = tmp_path / "cache"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "hwcompress.cli", "compile", str(small), "-o",
                                str(tmp_path / "out"), "--tune-trials", "64", "--cache-dir", str(cache)],
                               stderr=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(scratch)})
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "to tune with" in line:
            time.sleep(4)  # candidates are being built and run now
            process.send_signal(signal.SIGINT)
            break
    rest = process.stderr.read()
    process.wait(timeout=120)
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "hwc: interrupted" and "Traceback" not in rest
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # The tuning child and its workers are gone with it.
    children = subprocess.run(["pgrep", "-f", str(cache)], capture_output=True, text=True).stdout.split()
    assert not children
    assert not list(scratch.glob("hwc-*"))  # nor the candidates' libraries
    result = hwc("compile", str(small), "-o", str(tmp_path / "out"), "--tune-trials", "0", "--repeat", "2",
                 "--cache-dir", str(cache), "--json")
    assert result.returncode == 0, result.stderr


def test_unreachable_device_fails_in_seconds_before_tuning(tmp_path, small):
    start = time.monotonic()
    result = hwc("compile", str(small), "-o", str(tmp_path / "out"), "--device", "rpc://127.0.0.1:1/board",
                 "--tune-trials", "50", "--cache-dir", str(tmp_path / "cache"), "-q")
    _one_line(result, "cannot reach the RPC tracker")
    assert time.monotonic() - start < 30 and not (tmp_path / "cache").exists()
    _one_line(hwc("compile", str(small), "-o", str(tmp_path / "o"), "--device", "rpc://127.0.0.1:" + "9" * 30 + "/x"),
              "not in 1..65535")


# ---------------------------------------------------------------- cache
def test_torn_foreign_and_failed_database_lines_are_dropped(tmp_path):
    (tmp_path / WORKLOADS).write_text('["1","aaa"]\n{not json\n["2","bbb"]\n')
    good = [1, [["trace"], [1e-5], {"kind": "llvm"}, None]]  # refers to the third line: becomes index 1
    failed = [0, [["trace"], [1e10], {"kind": "llvm"}, None]]
    (tmp_path / RECORDS).write_text(json.dumps([2, good[1]]) + "\n" + json.dumps(failed) + "\n" + '[0,[["tr')
    warnings = []
    repair(tmp_path, warnings.append)
    assert [json.loads(line) for line in (tmp_path / WORKLOADS).read_text().splitlines()] == [["1", "aaa"], ["2", "bbb"]]
    assert [json.loads(line) for line in (tmp_path / RECORDS).read_text().splitlines()] == [good]
    assert len(warnings) == 2 and all(str(tmp_path) in w for w in warnings)
    repair(tmp_path, warnings.append)  # nothing left to drop: silent
    assert len(warnings) == 2


def test_a_torn_record_warns_once_and_the_compile_goes_on(tmp_path, small):
    from hwcompress.backend.tune import tuning_db_dir
    from hwcompress.config import get_target

    cache = tmp_path / "cache"
    database = tuning_db_dir(cache, get_target("host"))
    database.mkdir(parents=True)
    (database / WORKLOADS).write_text("")
    records = database / RECORDS
    records.write_text('[0,[[["GetSBlock",[],["conv')  # what a power cut leaves
    result = hwc("compile", str(small), "-o", str(tmp_path / "b"), "--tune-trials", "0", "--repeat", "2",
                 "--cache-dir", str(cache), "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("hwc: warning:") == 1 and str(records) in result.stderr


# ---------------------------------------------------------------- bad input, exit codes, quiet
def test_compare_bad_input_is_exit_2_and_writes_nothing(tmp_path, small):
    for args, fragment in [(["--targets", "host,nosuch"], "unknown target 'nosuch'"),
                           (["--targets", ","], "name at least one target"),
                           (["--targets", "host", "--device", "host=rpc://x"], "expected rpc://"),
                           (["--targets", "host", "--device", "arm-a72=rpc://h:1/k"], "not among --targets")]:
        _one_line(hwc("compare", str(small), "-o", str(tmp_path / "cmp"), *args), fragment)
    _one_line(hwc("compare", str(tmp_path / "missing.onnx"), "--targets", "host", "-o", str(tmp_path / "cmp")),
              "no such file")
    assert not (tmp_path / "cmp").exists()


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_odd_input_files_and_values_are_one_line(tmp_path, small):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    result = hwc("quantize", str(small), "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "q.onnx"), "-q")
    assert result.returncode == 0, result.stderr  # one array for a one-input model
    images = tmp_path / "images"
    images.mkdir()
    (images / "huge.png").write_bytes(_png_claiming(40000, 40000))
    _one_line(hwc("quantize", str(small), "--calib", str(images), "--preprocess", "resize=8,crop=8,scale=255",
                  "-o", str(tmp_path / "p.onnx")), "too large to decode")
    yaml_dir = tmp_path / "yaml"
    yaml_dir.mkdir()
    (yaml_dir / "x.yaml").write_bytes(b"name: caf\xe9\n")
    _one_line(hwc("targets", "--targets-dir", str(yaml_dir)), "not a UTF-8 text file")
    for args, fragment in [(["compile", str(small), "-o", str(tmp_path / "o"), "--repeat", "0"], "--repeat"),
                           (["lowrank", str(small), "-o", str(tmp_path / "l.onnx"), "--rank", "0"], "--rank"),
                           (["prune", str(small), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                             "--layer-ratio", "nosuchnode=0.5"], "no Conv/Gemm/MatMul layer named 'nosuchnode'"),
                           (["compile", str(small), "-o", str(tmp_path / "o"), "--tune-trials", "-1"], "--tune-trials")]:
        _one_line(hwc(*args), fragment)


def test_quiet_means_only_hwcs_own_lines(tmp_path, small):
    result = hwc("compile", str(small), "-o", str(tmp_path / "out"), "--tune-trials", "0", "--repeat", "3", "-q",
                 "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0 and result.stderr == ""
