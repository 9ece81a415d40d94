"""LSTM, GRU and RNN layers: on CPUs one loop kernel each (``backend.recurrent_loops``), elsewhere
unrolled into ops TVM imports (``passes.unroll_recurrent``); both compute ONNX Runtime's outputs."""

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


CONFIGURATIONS = [
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
]


@pytest.mark.parametrize("kind, options", CONFIGURATIONS)
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


def _host():
    from hwcompress.config.targets import get_target
    from hwcompress.config.vector_unit import VectorUnit

    target = get_target("host")
    return target, VectorUnit.of(target.tvm_target())


def _loop_kernels(model):
    """``model`` imported with its recurrent layers as loop kernels and lowered for this CPU."""
    from hwcompress.backend.build import lower
    from hwcompress.backend.importer import import_onnx

    target, unit = _host()
    return lower(import_onnx(model, unit), target)


@pytest.mark.parametrize("kind, options", CONFIGURATIONS)
def test_recurrent_layers_run_as_loop_kernels_computing_onnx_runtimes_outputs(kind, options):
    """The same configurations compiled by TVM with the recurrence in one loop kernel per layer
    (and the input projection a kernel of its own): every output as ONNX Runtime computes it."""
    from tvm import tirx

    model = recurrent_model(kind, **options)
    kernels = _loop_kernels(model)
    loops = [g.name_hint for g, f in kernels.functions.items() if isinstance(f, tirx.PrimFunc)
             and f.attrs is not None and "hwc.schedule" in f.attrs]
    assert loops == [kind.lower()]
    assert_built_like_onnxruntime(kernels, _host()[0], model)


def _batch_first_outputs(run) -> None:
    """``run(model, feeds)`` of a batch-first (``layout=1``) bidirectional LSTM against ONNX
    Runtime's time-major layer on transposed tensors (it has no kernel for ``layout=1``)."""
    from hwcompress.model import reference as ort

    batch_first = recurrent_model("LSTM", direction="bidirectional", initial=True, batch_first=True)
    time_major = recurrent_model("LSTM", direction="bidirectional", initial=True)
    feeds = ort.random_inputs(time_major, seed=1)
    expected = ort.run(time_major, feeds)
    got = run(batch_first, {k: np.ascontiguousarray(v.swapaxes(0, 1)) for k, v in feeds.items()})
    np.testing.assert_allclose(got[0], expected[0].transpose(2, 0, 1, 3), atol=1e-6)
    for g, e in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(g, e.swapaxes(0, 1), atol=1e-6)


def test_a_batch_first_layer_matches_its_time_major_form():
    """``layout=1`` (batch-first, as Keras and batch_first PyTorch modules export), unrolled."""
    from hwcompress.model import reference as ort

    _batch_first_outputs(lambda model, feeds: ort.run(unroll_recurrent(model), feeds))


def test_a_batch_first_layer_runs_as_a_loop_kernel():
    """The same, compiled by TVM with the loop kernel (the layout transposed around it)."""
    import tvm
    from tvm import relax

    from hwcompress.backend.build import build
    from hwcompress.backend.runtime import outputs_to_numpy

    def run(model, feeds):
        vm = relax.VirtualMachine(build(_loop_kernels(model), _host()[0], None), tvm.cpu())
        return outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))
    _batch_first_outputs(run)


def _gru_into_lstm(steps: int = 6) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    shapes = {"gw": (1, 24, 8), "gr": (1, 24, 8), "lw": (2, 32, 8), "lr": (2, 32, 8), "lb": (2, 64)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("GRU", ["x", "gw", "gr"], ["gy"], hidden_size=8),
             helper.make_node("Squeeze", ["gy", "axis"], ["g"]),
             helper.make_node("LSTM", ["g", "lw", "lr", "lb"], ["y"], hidden_size=8, direction="bidirectional")]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    graph = helper.make_graph(nodes, "gru_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, 2, 1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_unrolled_lstm_and_gru_compile_to_what_onnx_runtime_computes():
    """A GRU feeding a bidirectional LSTM, imported without a CPU's vector unit (as for GPU
    targets): unrolled before TVM (which imports neither), lowered and built."""
    from hwcompress.backend.build import lower
    from hwcompress.backend.importer import import_onnx

    model = _gru_into_lstm()
    target = _host()[0]
    kernels = lower(import_onnx(model), target)
    assert not any("hwc.schedule" in (f.attrs or {}) for f in kernels.functions.values())
    assert_built_like_onnxruntime(kernels, target, model)


def test_layers_in_sequence_run_as_loop_kernels():
    """The same model on this CPU: one loop kernel per layer, and as many kernels for 24 steps as
    for 6 (none per step)."""
    from tvm import tirx

    def kernel_names(model) -> list[str]:
        kernels = _loop_kernels(model)
        return sorted(g.name_hint for g, f in kernels.functions.items() if isinstance(f, tirx.PrimFunc))

    model = _gru_into_lstm()
    names = kernel_names(model)
    assert "gru" in names and "lstm" in names
    assert kernel_names(_gru_into_lstm(steps=24)) == names
    assert_built_like_onnxruntime(_loop_kernels(model), _host()[0], model)


def test_per_entry_sequence_lengths_are_refused_in_one_line(tmp_path):
    """Lengths that differ per batch entry are not compiled (neither unrolled nor looped); TVM
    cannot import the layer either, so loading says which node and why instead of failing inside
    TVM."""
    from hwcompress.model.loading import load_model

    path = tmp_path / "m.onnx"
    onnx.save(recurrent_model("LSTM", lengths=[5, 3]), path)
    with pytest.raises(HwcError) as exc:
        load_model(path)
    assert "LSTM at node" in str(exc.value) and "sequence_lens" in str(exc.value) and "\n" not in str(exc.value)


def test_run_time_recurrent_weights_are_refused_in_one_line(tmp_path):
    """A recurrent weight fed as a graph input (neither the loop kernel nor unrolling takes one):
    loading says which op and why, in one line."""
    from hwcompress.model.loading import load_model

    model = recurrent_model("GRU")
    weight = next(i for i in model.graph.initializer if i.name == "R")
    model.graph.initializer.remove(weight)
    model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, list(weight.dims)))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(HwcError) as exc:
        load_model(tmp_path / "m.onnx")
    assert "GRU at node" in str(exc.value) and "weights are not constant" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_float16_layer_computes_in_float32_and_returns_float16():
    """A float16 model's recurrent layer: the loop kernel reads and writes float32, the outputs
    keep the node's type, within float16's rounding of ONNX Runtime's float32 result."""
    import tvm
    from tvm import relax

    from hwcompress.backend.build import build
    from hwcompress.backend.runtime import outputs_to_numpy
    from hwcompress.model import reference as ort

    model = recurrent_model("LSTM", direction="bidirectional", initial=True, batch_first=True)
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for t in half.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(half.graph.input) + list(half.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    feeds = ort.random_inputs(model, seed=1)
    vm = relax.VirtualMachine(build(_loop_kernels(half), _host()[0], None), tvm.cpu())
    got = outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v.astype(np.float16)) for v in feeds.values()]))
    for g, e in zip(got, ort.run(unroll_recurrent(model), feeds)):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float32), e, atol=2e-3)


def test_recurrent_layers_are_counted_and_priced_by_their_steps():
    """``hwc inspect`` counts a layer's multiply-accumulates (every step: the input's and the
    state's products), and the cycle model of a target with no device prices its steps' products
    (twice the steps: twice the cycles), not only moving its output as for an elementwise op."""
    from hwcompress.config.targets import get_target
    from hwcompress.measure.cycle_model import modelled_latency
    from hwcompress.model.summary import summarize

    short, long = (recurrent_model("LSTM", steps=steps, direction="bidirectional") for steps in (20, 40))
    (layer,) = summarize(short)["layers"]
    assert layer["op"] == "LSTM" and layer["macs"] == 20 * 2 * 2 * 16 * (3 + 4)  # T * B * D * G * (I + H)
    npu16 = get_target("npu16")
    cycles = [modelled_latency(m, npu16)[1][0]["cycles"] for m in (short, long)]
    output_bytes = 20 * 2 * 2 * 4
    assert cycles[0] > 10 * output_bytes / npu16.latency.model.bytes_per_cycle
    assert cycles[1] == pytest.approx(2 * cycles[0], rel=0.05)


def test_a_step_is_split_among_idle_cores_only_where_it_pays():
    """One job (a direction of a batch entry) and idle cores: each step's hidden units are shared
    out once a step's products are large enough; not where the jobs fill the cores or a step is
    small (hidden 64: 2.8x slower split, a parallel region a step)."""
    from hwcompress.backend.recurrent_loops import LoopSpec, _parts

    def spec(kind="LSTM", hidden=128, directions=1, batch=1, lbr=False):
        return LoopSpec(kind, 100, batch, hidden, (False, True)[:directions], (), linear_before_reset=lbr)

    assert _parts(spec(), cores=2) == 2 and _parts(spec(hidden=96), cores=4) == 4
    assert _parts(spec(directions=2), cores=2) == 1 and _parts(spec(batch=2), cores=2) == 1
    assert _parts(spec(hidden=64), cores=2) == 1
    assert _parts(spec("GRU", lbr=False), cores=2) == _parts(spec("GRU", lbr=True), cores=2) == 2


@pytest.mark.parametrize("kind, options", [
    ("LSTM", {"direction": "reverse", "peepholes": True, "initial": True, "clip": 0.7}),
    ("LSTM", {"input_forget": 1, "batch": 1}),
    ("GRU", {"linear_before_reset": 1, "initial": True}),
    ("GRU", {"direction": "reverse", "initial": True}),
    ("RNN", {"direction": "bidirectional", "initial": True}),
])
def test_split_steps_compute_onnx_runtimes_outputs(monkeypatch, kind, options):
    """Steps shared out among threads (forced here on tiny layers: 4 threads of 4 units; 2 of 8
    for the bidirectional RNN's 4 jobs) give ONNX Runtime's outputs: the threads read one copy of
    the hidden state and write the other; a GRU without linear_before_reset in two parallel
    regions a step, as its candidate's product reads every unit's reset gate."""
    from hwcompress.backend import recurrent_loops

    monkeypatch.setattr(recurrent_loops, "SPLIT_WORK", 0)
    monkeypatch.setattr(recurrent_loops, "physical_cores", lambda: 8)
    model = recurrent_model(kind, hidden=16, **options)
    kernels = _loop_kernels(model)
    (loop,) = [f for g, f in kernels.functions.items() if g.name_hint == kind.lower()]
    loops = [line.strip() for line in loop.script().splitlines() if line.strip().startswith("for ")]
    assert "T.parallel" not in loops[0] and any("T.parallel" in line for line in loops)  # jobs serial, steps split
    assert_built_like_onnxruntime(kernels, _host()[0], model)
