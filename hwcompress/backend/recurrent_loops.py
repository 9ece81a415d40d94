"""LSTM, GRU and RNN layers on CPUs as one loop kernel each: the recurrence stays inside one TIR
function instead of becoming hundreds of kernels.

Unrolled (``passes.unroll_recurrent``), an 80-step bidirectional LSTM was 480 kernel calls and
1800 VM allocations and frees per run, and 1.26-1.48x ONNX Runtime's time however fast each
kernel ran; compiling the thousands of ops took most of a CRNN's build. Here the importer turns
each recurrent node into what a hand-written kernel would do:

- every step's input projection at once, ``X W^T`` plus the biases that sit outside the gates'
  nonlinearity: one MatMul in Relax, so the register-blocked conv schedule runs it (the large,
  parallel part of the layer);
- one loop kernel for the recurrence: a parallel loop over (direction, batch entry), each thread
  keeping its hidden and cell state in a small buffer and stepping through time serially: the
  gates' pre-activations (the projection's row plus the state times the recurrent weights,
  transposed at compile time so that the inner loop runs along whole vectors of gate outputs,
  accumulated in registers a chunk of vectors at a time), then the activations and the state
  update, vectorized over the hidden units.

Every attribute of the ONNX definitions is honoured as the unrolled form does (directions,
batch-first layout, initial states, peepholes, clip, input_forget, GRU's linear_before_reset,
activations with alpha/beta). GPU targets keep the unrolled form (this kernel is CPU code).
No TIR ``Let`` is used inside the vectorized loops: TVM 0.27 vectorizes a let-bound index wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config.vector_unit import VectorUnit, widest_lanes
from ..model.recurrent import DEFAULT_ACTIVATIONS, GATES, parse_activations

SCHEDULE = "hwc recurrent loop"  # what kernel_info calls these kernels' schedule


@dataclass(frozen=True)
class LoopSpec:
    """One recurrent layer as its loop kernel sees it (time-major, directions stacked)."""

    kind: str                  # LSTM, GRU or RNN
    steps: int
    batch: int
    hidden: int
    reverse: tuple[bool, ...]  # per direction
    activations: tuple         # per direction, a tuple of (op, alpha, beta)
    clip: float | None = None
    input_forget: bool = False
    linear_before_reset: bool = False  # GRU only
    initial_h: bool = False
    initial_c: bool = False
    peepholes: bool = False

    @property
    def gates(self) -> int:
        return GATES[self.kind] * self.hidden

    @property
    def directions(self) -> int:
        return len(self.reverse)


def loop_kernel(spec: LoopSpec, unit: VectorUnit):
    """The recurrence of ``spec`` as a scheduled PrimFunc: reads the projected inputs
    [T, B, D*G] and the biases to add to them [D*G] (the add fused here rather than a pass over
    the projection of its own), the transposed recurrent weights [D, H, G] and the optional
    initial states [D, B, H], peepholes [D, 3H] and GRU recurrent candidate bias [D, H]; writes
    Y [T, D, B, H], the last hidden state [D, B, H] and for LSTMs the last cell state [D, B, H]."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    H, G, D, B, steps = spec.hidden, spec.gates, spec.directions, spec.batch, spec.steps
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(spec.kind.lower())
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "hwc.schedule": SCHEDULE})
            shapes = {"projected": (steps, B, D * G), "bias": (D * G,), "recurrent": (D, H, G),
                      "initial_h": (D, B, H) if spec.initial_h else None,
                      "initial_c": (D, B, H) if spec.initial_c else None,
                      "peepholes": (D, 3 * H) if spec.peepholes else None,
                      "candidate_bias": (D, H) if spec.linear_before_reset else None,
                      "y": (steps, D, B, H), "y_h": (D, B, H), "y_c": (D, B, H) if spec.kind == "LSTM" else None}
            args = {name: T.arg(name, T.Buffer(shape, "float32")) if shape else None for name, shape in shapes.items()}
            with T.sblock("root"):
                with T.sblock("recurrence"):  # one opaque block under the root, as TVM's passes expect
                    with T.parallel(0, D * B) as job:
                        _Thread(T, spec, unit, args, job // B, job % B).run()
    return builder.get()


class _Thread:
    """Writes one (direction, batch entry)'s work: its state in buffers of its own, the steps in
    time order (reversed for a reverse direction)."""

    def __init__(self, T, spec: LoopSpec, unit: VectorUnit, args: dict, d, b):
        self.T, self.spec, self.args, self.d, self.b = T, spec, args, d, b
        H, G = spec.hidden, spec.gates
        self.gate_lanes = widest_lanes(G, unit.lanes) or 1
        self.hidden_lanes = widest_lanes(H, unit.lanes) or 1
        # Gate vectors accumulated at once: as many as the registers hold beside the operands.
        self.per_chunk = _largest_divisor(G // self.gate_lanes, max(1, unit.registers - 6))
        self.h = T.alloc_buffer((H,), "float32")
        self.c = T.alloc_buffer((H,), "float32") if spec.kind == "LSTM" else None
        self.g = T.alloc_buffer((G,), "float32")  # the gates' pre-activations
        self.lbr = spec.linear_before_reset
        self.gated = T.alloc_buffer((H,), "float32") if spec.kind == "GRU" and not self.lbr else None

    def run(self) -> None:
        from tvm import tirx

        spec, a, d, b = self.spec, self.args, self.d, self.b
        zero = tirx.const(0.0, "float32")

        def start(m):
            self.T.buffer_store(self.h, a["initial_h"][d, b, m] if a["initial_h"] is not None else zero, [m])
            if self.c is not None:
                self.T.buffer_store(self.c, a["initial_c"][d, b, m] if a["initial_c"] is not None else zero, [m])
        self.hidden_loop(start)
        with self.T.serial(0, spec.steps) as step:
            last = spec.steps - 1
            t = step if spec.reverse == (False,) else last - step if spec.reverse == (True,) else (
                tirx.Select(d == 0, step, last - step))
            self.load_gates(t)
            {"LSTM": self.lstm_step, "GRU": self.gru_step, "RNN": self.rnn_step}[spec.kind](t)
            self.hidden_loop(lambda m: self.T.buffer_store(a["y"], self.h[m], [t, d, b, m]))

        def finish(m):
            self.T.buffer_store(a["y_h"], self.h[m], [d, b, m])
            if self.c is not None:
                self.T.buffer_store(a["y_c"], self.c[m], [d, b, m])
        self.hidden_loop(finish)

    # ------------------------------------------------------------------ loops and expressions
    def vector_loop(self, count: int, lanes: int, body) -> None:
        """``body(i)`` for i in range(count), ``lanes`` at a time."""
        with self.T.serial(0, count // lanes) as outer:
            with self.T.vectorized(0, lanes) as inner:
                body(outer * lanes + inner)

    def hidden_loop(self, body) -> None:
        self.vector_loop(self.spec.hidden, self.hidden_lanes, body)

    def activate(self, x, which: int, clipped: bool = True):
        """Activation ``which`` of the node's list (per direction) of ``x``, clipped first where
        the node clips."""
        from tvm import tirx

        clip = self.spec.clip
        if clipped and clip is not None:
            x = tirx.max(tirx.min(x, tirx.const(clip, "float32")), tirx.const(-clip, "float32"))
        per_direction = [acts[which] for acts in self.spec.activations]
        result = _activation(x, *per_direction[-1])
        for index in range(len(per_direction) - 2, -1, -1):
            if per_direction[index] != per_direction[-1]:
                result = tirx.Select(self.d == index, _activation(x, *per_direction[index]), result)
        return result

    def projected(self, t, j):
        """Step ``t``'s input term of gate column ``j``: its projection plus the folded biases."""
        at = self.d * self.spec.gates + j
        return self.args["projected"][t, self.b, at] + self.args["bias"][at]

    def load_gates(self, t) -> None:
        """g = the step's input terms (GRU with linear_before_reset: the candidate's columns start
        from its recurrent bias instead; the input term is added after the reset gate)."""
        from tvm import tirx

        H = self.spec.hidden
        if self.lbr:
            value = lambda j: tirx.Select(j < 2 * H, self.projected(t, j),  # noqa: E731
                                          self.args["candidate_bias"][self.d, tirx.max(j - 2 * H, 0)])
        else:
            value = lambda j: self.projected(t, j)  # noqa: E731
        self.vector_loop(self.spec.gates, self.gate_lanes, lambda j: self.T.buffer_store(self.g, value(j), [j]))

    def recurrent_product(self, state, first: int, count: int) -> None:
        """g[first:first+count] += state . weights[d, :, first:first+count], a chunk of gate
        vectors at a time, each chunk's accumulators kept over the whole sum."""
        T, weights, lanes = self.T, self.args["recurrent"], self.gate_lanes
        chunk = _largest_divisor(count // lanes, self.per_chunk)
        with T.serial(0, count // (lanes * chunk)) as part:
            with T.serial(0, self.spec.hidden) as k:
                with T.unroll(0, chunk) as vector:
                    with T.vectorized(0, lanes) as lane:
                        j = first + (part * chunk + vector) * lanes + lane
                        T.buffer_store(self.g, self.g[j] + state[k] * weights[self.d, k, j], [j])

    # ------------------------------------------------------------------ the three kinds
    def lstm_step(self, t) -> None:
        """c = f * c + i * g(c~); h = o * h(c): gates i, o, f, c~ in ONNX's order, peepholes on
        the old cell for i and f and on the new one for o."""
        H, g, c = self.spec.hidden, self.g, self.c
        self.recurrent_product(self.h, 0, self.spec.gates)

        def peeped(m, k: int):
            peep = self.args["peepholes"]
            return g[k * H + m] if peep is None else g[k * H + m] + peep[self.d, k * H + m] * c[m]

        def update_cell(m):
            i = self.activate(peeped(m, 0), 0)
            f = 1.0 - i if self.spec.input_forget else self.activate(peeped(m, 2), 0)
            self.T.buffer_store(c, f * c[m] + i * self.activate(g[3 * H + m], 1), [m])

        def update_hidden(m):
            self.T.buffer_store(self.h, self.activate(peeped(m, 1), 0) * self.activate(c[m], 2, clipped=False), [m])

        self.hidden_loop(update_cell)
        self.hidden_loop(update_hidden)

    def gru_step(self, t) -> None:
        """z and r from the first two gates; the candidate from the input's third gate and either
        r * (h R_h + Rb_h) (linear_before_reset) or (r * h) R_h (its bias folded into the
        input's); h = (1 - z) * candidate + z * h."""
        H, g, h = self.spec.hidden, self.g, self.h
        if self.lbr:  # one product by all three gates' weights
            self.recurrent_product(h, 0, self.spec.gates)

            def candidate(m):
                return self.activate(self.projected(t, 2 * H + m) + self.activate(g[H + m], 0) * g[2 * H + m], 1)
        else:
            self.recurrent_product(h, 0, 2 * H)
            self.hidden_loop(lambda m: self.T.buffer_store(self.gated, self.activate(g[H + m], 0) * h[m], [m]))
            self.recurrent_product(self.gated, 2 * H, H)

            def candidate(m):
                return self.activate(g[2 * H + m], 1)

        def update(m):
            z = self.activate(g[m], 0)
            self.T.buffer_store(h, (1.0 - z) * candidate(m) + z * h[m], [m])
        self.hidden_loop(update)

    def rnn_step(self, t) -> None:
        self.recurrent_product(self.h, 0, self.spec.gates)
        self.hidden_loop(lambda m: self.T.buffer_store(self.h, self.activate(self.g[m], 0), [m]))


def _activation(x, op: str, alpha, beta):
    """ONNX recurrent activation ``op`` of the float32 expression ``x``."""
    from tvm import tirx

    def const(value):
        return tirx.const(float(value), "float32")

    zero, one = const(0.0), const(1.0)
    if op == "Sigmoid":
        return tirx.sigmoid(x)
    if op == "Tanh":
        return tirx.tanh(x)
    if op == "Relu":
        return tirx.max(x, zero)
    if op == "LeakyRelu":
        return tirx.Select(x >= zero, x, x * const(alpha))
    if op == "ThresholdedRelu":
        return tirx.Select(x > const(alpha), x, zero)
    if op == "Elu":
        return tirx.Select(x >= zero, x, const(alpha) * (tirx.exp(x) - one))
    if op == "HardSigmoid":
        return tirx.max(zero, tirx.min(one, x * const(alpha) + const(beta)))
    if op == "Affine":
        return x * const(alpha) + const(beta)
    if op == "ScaledTanh":
        return const(alpha) * tirx.tanh(x * const(beta))
    if op == "Softsign":
        return x / (one + tirx.abs(x))
    if op == "Softplus":
        return tirx.log(one + tirx.exp(x))
    raise ValueError(f"activation {op} is not an ONNX recurrent activation")


def _largest_divisor(count: int, limit: int) -> int:
    return max(k for k in range(1, min(count, limit) + 1) if count % k == 0)


# ---------------------------------------------------------------------------------- the importer side
def converter(kind: str, unit: VectorUnit):
    """The Relax frontend's converter for ONNX op ``kind``: the input projection as a MatMul,
    the recurrence as ``loop_kernel``; outputs as the ONNX node's (Y, Y_h[, Y_c])."""
    def convert(cls, bb, inputs, attr, params):
        return _convert(kind, unit, bb, list(inputs) + [None] * (8 - len(inputs)), attr)
    return convert


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _convert(kind: str, unit: VectorUnit, bb, inputs, attr):
    """The layer in Relax: its input projection, the loop kernel, the outputs in the node's layout
    and type (the kernel computes in float32)."""
    from tvm import relax

    x = bb.normalize(inputs[0])
    dtype, batch_first = str(x.ty.dtype), bool(attr.get("layout", 0))
    spec, weights, recurrent, bias, peepholes = _layer(kind, [int(v) for v in x.ty.shape], inputs, attr)
    H, G, D = spec.hidden, spec.gates, spec.directions

    def as_kernel_reads(state):  # [B, D, H] (batch-first) -> [D, B, H], in float32
        state = relax.op.permute_dims(state, [1, 0, 2]) if batch_first else state
        return relax.op.astype(state, "float32") if dtype != "float32" else state

    def as_node_writes(tensor, batch_first_axes):
        tensor = relax.op.permute_dims(tensor, batch_first_axes) if batch_first else tensor
        return relax.op.astype(tensor, dtype) if dtype != "float32" else tensor

    def const(value: np.ndarray):
        return relax.const(np.ascontiguousarray(value).astype(np.float32))

    w_bias, r_bias = bias[:, :G], bias[:, G:]
    folded = w_bias + r_bias
    if spec.linear_before_reset:  # the candidate's recurrent bias is multiplied by r: it stays in the loop
        folded[:, 2 * H:] = w_bias[:, 2 * H:]
    sequence = as_kernel_reads(x) if batch_first or dtype != "float32" else x
    projection = weights.transpose(2, 0, 1).reshape(weights.shape[-1], D * G)  # [I, D*G]
    args = [relax.op.matmul(sequence, const(projection)), const(folded.reshape(-1)), const(recurrent.transpose(0, 2, 1))]
    args += [as_kernel_reads(inputs[5])] if spec.initial_h else []
    args += [as_kernel_reads(inputs[6])] if spec.initial_c else []
    args += [const(peepholes)] if spec.peepholes else []
    args += [const(r_bias[:, 2 * H:])] if spec.linear_before_reset else []
    state = relax.TensorType([D, spec.batch, H], "float32")
    outs = [relax.TensorType([spec.steps, D, spec.batch, H], "float32"), state] + ([state] if kind == "LSTM" else [])
    call = bb.emit(relax.call_tir(bb.add_func(loop_kernel(spec, unit), kind.lower()), args, outs))
    results = [as_node_writes(relax.TupleGetItem(call, 0), [2, 0, 1, 3])]
    results += [as_node_writes(relax.TupleGetItem(call, i), [1, 0, 2]) for i in range(1, len(outs))]
    return relax.Tuple([bb.emit(r) for r in results])


def _layer(kind: str, shape: list[int], inputs: list, attr: dict):
    """(LoopSpec, W, R, B, P) of a recurrent node from its input's shape, its inputs (None where
    absent) and its attributes; weights as arrays."""
    from .relax_rewrite import constant_value

    constants = [None if i is None else constant_value(i) for i in inputs]
    weights, recurrent = constants[1], constants[2]
    if any(i is not None and c is None for i, c in list(zip(inputs, constants))[1:5] + [(inputs[7], constants[7])]):
        raise ValueError(f"{kind} weights are not constant")  # the loader refuses these first
    batch_first = bool(attr.get("layout", 0))
    reverse = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}[
        _text(attr.get("direction", "forward"))]
    dirs, hidden = len(reverse), int(attr.get("hidden_size", 0)) or recurrent.shape[-1]
    steps, batch = (shape[1], shape[0]) if batch_first else (shape[0], shape[1])
    lengths = constants[4]
    if lengths is not None and np.any(lengths != steps):
        raise ValueError(f"{kind} sequence_lens differ from the sequence length")
    acts = parse_activations(kind, dirs, [_text(a) for a in attr.get("activations", ())],
                             list(attr.get("activation_alpha", ())), list(attr.get("activation_beta", ())))
    per = len(DEFAULT_ACTIVATIONS[kind])
    bias = constants[3] if constants[3] is not None else np.zeros((dirs, 2 * GATES[kind] * hidden), np.float32)
    peepholes = constants[7] if kind == "LSTM" else None
    spec = LoopSpec(kind, steps, batch, hidden, reverse, tuple(tuple(acts[i * per:(i + 1) * per]) for i in range(dirs)),
                    clip=float(attr["clip"]) if "clip" in attr else None,
                    input_forget=kind == "LSTM" and bool(attr.get("input_forget", 0)),
                    linear_before_reset=kind == "GRU" and bool(attr.get("linear_before_reset", 0)),
                    initial_h=inputs[5] is not None, initial_c=kind == "LSTM" and inputs[6] is not None,
                    peepholes=peepholes is not None)
    return spec, weights, recurrent, bias, peepholes
