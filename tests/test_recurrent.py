"""LSTM, GRU and RNN layers unrolled into ops TVM imports: the same outputs as ONNX Runtime's own
recurrent kernels, and a compiled model that computes them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_built_like_onnxruntime, assert_same_outputs, op_count
from hwcompress.errors import HwcError
from hwcompress.passes import unroll_recurrent

from hwcompress.model.recurrent import GATES


def recurrent_model(kind: str, steps: int = 5, batch: int = 2, features: int = 3, hidden: int = 4,
                    direction: str = "forward", initial: bool = False, peepholes: bool = False,
                    batch_first: bool = False, lengths=None, seed: int = 0, **attrs) -> onnx.ModelProto:
    """One recurrent node with random weights and biases; Y, Y_h (and Y_c) all graph outputs."""
    rng = np.random.default_rng(seed)
    dirs, gates = (2 if direction == "bidirectional" else 1), GATES[kind]
    weights = {"W": (dirs, gates * hidden, features), "R": (dirs, gates * hidden, hidden), "B": (dirs, 2 * gates * hidden)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n) for n, s in weights.items()]
    state = [batch, dirs, hidden] if batch_first else [dirs, batch, hidden]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                            [batch, steps, features] if batch_first else [steps, batch, features])]
    names = ["x", "W", "R", "B", ""]
    if lengths is not None:
        inits.append(numpy_helper.from_array(np.asarray(lengths, np.int32), "lengths"))
        names[4] = "lengths"
    if initial:
        states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
        names += states
        inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, state) for s in states]
    if peepholes:
        names += [""] * (7 - len(names)) + ["P"]
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (dirs, 3 * hidden)).astype(np.float32), "P"))
    outputs = ["Y", "Y_h", "Y_c"][:3 if kind == "LSTM" else 2]
    node = helper.make_node(kind, names, outputs, hidden_size=hidden, direction=direction,
                            **({"layout": 1} if batch_first else {}), **attrs)
    graph = helper.make_graph([node], "rnn", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                      for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("kind, options", [
    ("LSTM", {}),
    ("LSTM", {"direction": "bidirectional", "initial": True}),
    ("LSTM", {"direction": "reverse", "peepholes": True, "initial": True, "clip": 0.7}),
    ("LSTM", {"input_forget": 1, "activations": ["HardSigmoid", "Tanh", "Tanh"], "activation_alpha": [0.3],
              "activation_beta": [0.4], "lengths": [5, 5]}),
    ("GRU", {"direction": "bidirectional", "initial": True}),
    ("GRU", {"linear_before_reset": 1}),
    ("GRU", {"linear_before_reset": 1, "initial": True, "activations": ["Sigmoid", "LeakyRelu"],
             "activation_alpha": [0.05]}),
    ("RNN", {"direction": "bidirectional", "initial": True, "activations": ["Relu", "Tanh"]}),
])
def test_recurrent_layers_unroll_to_onnx_runtimes_outputs(kind, options):
    """Every output (the sequence, the last hidden and cell states) as ONNX Runtime's kernel
    computes it, with no recurrent op left; steps from a zero state skip the recurrent product."""
    model = recurrent_model(kind, **options)
    result = unroll_recurrent.apply(model)
    assert result.log.applied and not any(op_count(result.model, k) for k in GATES)
    assert_same_outputs(model, result.model, tol=1e-5)
    dirs = 2 if options.get("direction") == "bidirectional" else 1
    per_step = 2 if kind == "GRU" and not options.get("linear_before_reset") else 1
    steps_with_state = 5 if options.get("initial") else 4
    assert op_count(result.model, "MatMul") == dirs * (1 + per_step * steps_with_state)


def test_a_batch_first_layer_matches_its_time_major_form():
    """``layout=1`` (batch-first, as Keras and batch_first PyTorch modules export): ONNX Runtime
    has no kernel for it, so the reference is the time-major layer on transposed tensors."""
    from hwcompress.model import reference as ort

    batch_first = unroll_recurrent(recurrent_model("LSTM", direction="bidirectional", initial=True, batch_first=True))
    time_major = recurrent_model("LSTM", direction="bidirectional", initial=True)
    feeds = ort.random_inputs(time_major, seed=1)
    expected = ort.run(time_major, feeds)
    got = ort.run(batch_first, {k: np.ascontiguousarray(v.swapaxes(0, 1)) for k, v in feeds.items()})
    np.testing.assert_allclose(got[0], expected[0].transpose(2, 0, 1, 3), atol=1e-6)
    for g, e in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(g, e.swapaxes(0, 1), atol=1e-6)


def test_an_unrolled_lstm_and_gru_compile_to_what_onnx_runtime_computes():
    """A GRU feeding a bidirectional LSTM, lowered and built by TVM (which imports neither)."""
    from hwcompress.backend.build import lower
    from hwcompress.backend.importer import import_onnx
    from hwcompress.config.targets import get_target
    from hwcompress.passes import run_canonical

    rng = np.random.default_rng(0)
    shapes = {"gw": (1, 24, 8), "gr": (1, 24, 8), "lw": (2, 32, 8), "lr": (2, 32, 8), "lb": (2, 64)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("GRU", ["x", "gw", "gr"], ["gy"], hidden_size=8),
             helper.make_node("Squeeze", ["gy", "axis"], ["g"]),
             helper.make_node("LSTM", ["g", "lw", "lr", "lb"], ["y"], hidden_size=8, direction="bidirectional")]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    graph = helper.make_graph(nodes, "gru_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 2, 1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    canonical, _ = run_canonical(model)
    target = get_target("host")
    assert_built_like_onnxruntime(lower(import_onnx(canonical), target), target, model)


def test_per_entry_sequence_lengths_are_refused_in_one_line(tmp_path):
    """Lengths that differ per batch entry are not unrolled; TVM cannot import the layer either,
    so loading says which node and why instead of failing inside TVM."""
    from hwcompress.model.loading import load_model

    path = tmp_path / "m.onnx"
    onnx.save(recurrent_model("LSTM", lengths=[5, 3]), path)
    with pytest.raises(HwcError) as exc:
        load_model(path)
    assert "LSTM at node" in str(exc.value) and "sequence_lens" in str(exc.value) and "\n" not in str(exc.value)
