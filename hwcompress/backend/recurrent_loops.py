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
  accumulated in registers a block of vectors at a time, and packed by those blocks so that a
  thread streams its weights in order, ``column_block``), then the activations and the state
  update, vectorized over the hidden units.

Every attribute of the ONNX definitions is honoured as the unrolled form does (directions,
batch-first layout, initial states, peepholes, clip, input_forget, GRU's linear_before_reset,
activations with alpha/beta). GPU targets keep the unrolled form (this kernel is CPU code).
No TIR ``Let`` is used inside the vectorized loops: TVM 0.27 vectorizes a let-bound index wrongly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config.host import physical_cores
from ..config.vector_unit import VectorUnit, widest_lanes
from ..model.recurrent import DEFAULT_ACTIVATIONS, GATES, parse_activations

SCHEDULE = "hwc recurrent loop"  # what kernel_info calls these kernels' schedule
# Recurrent multiply-adds a step from which one job's steps are split among the cores (each step
# then a parallel region of its own), where the layer has fewer jobs (directions x batch entries)
# than cores. Measured on unidirectional LSTMs at batch 1 over 100 steps (AMD Zen 4, 2 threads),
# TVM/ORT split / not split: hidden 64 (16K a step) 2.79 / 1.24, 96 (37K) 1.03 / 1.19, 128 (66K)
# 0.91 / 0.98, 256 0.95 / 1.28, 512 1.12 / 1.87.
SPLIT_WORK = 1 << 15


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
    parts: int = 1  # threads sharing each step's hidden units (1: one thread per direction and batch entry)

    @property
    def gates(self) -> int:
        return GATES[self.kind] * self.hidden

    @property
    def directions(self) -> int:
        return len(self.reverse)


def loop_kernel(spec: LoopSpec, unit: VectorUnit):
    """The recurrence of ``spec`` as a scheduled PrimFunc: reads the projected inputs
    [T, B, D*G] and the biases to add to them [D*G] (the add fused here rather than a pass over
    the projection of its own), the recurrent weights packed by ``pack_recurrent`` [D, G/W, H, W]
    (W: ``column_block``) and the optional
    initial states [D, B, H], peepholes [D, 3H] and GRU recurrent candidate bias [D, H]; writes
    Y [T, D, B, H], the last hidden state [D, B, H] and for LSTMs the last cell state [D, B, H]."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    H, G, D, B, steps = spec.hidden, spec.gates, spec.directions, spec.batch, spec.steps
    block = column_block(spec, unit)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(spec.kind.lower())
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "hwc.schedule": SCHEDULE})
            shapes = {"projected": (steps, B, D * G), "bias": (D * G,), "recurrent": (D, G // block, H, block),
                      "initial_h": (D, B, H) if spec.initial_h else None,
                      "initial_c": (D, B, H) if spec.initial_c else None,
                      "peepholes": (D, 3 * H) if spec.peepholes else None,
                      "candidate_bias": (D, H) if spec.linear_before_reset else None,
                      "y": (steps, D, B, H), "y_h": (D, B, H), "y_c": (D, B, H) if spec.kind == "LSTM" else None}
            args = {name: T.arg(name, T.Buffer(shape, "float32")) if shape else None for name, shape in shapes.items()}
            with T.sblock("root"):
                with T.sblock("recurrence"):  # one opaque block under the root, as TVM's passes expect
                    # Threads take whole (direction, batch entry) jobs, or where a step is split
                    # among them (``parts``), the jobs run one after the other.
                    with (T.parallel if spec.parts == 1 else T.serial)(0, D * B) as job:
                        _Job(T, spec, unit, args, job // B, job % B).run()
    return builder.get().without_attr("global_symbol")  # named where it is added: kernels of other shapes share the name


class _Job:
    """Writes one (direction, batch entry)'s work: its state in buffers of its own, the steps in
    time order (reversed for a reverse direction). With ``spec.parts`` > 1 each step's hidden units
    are split among that many threads (a parallel region a step, two for a GRU without
    linear_before_reset; the hidden state double-buffered so that no thread overwrites what
    another still reads)."""

    def __init__(self, T, spec: LoopSpec, unit: VectorUnit, args: dict, d, b):
        self.T, self.spec, self.args, self.d, self.b = T, spec, args, d, b
        H, G = spec.hidden, spec.gates
        self.units = H // spec.parts  # hidden units a thread updates each step
        self.vector_lanes = unit.lanes
        self.block = column_block(spec, unit)
        self.h = T.alloc_buffer((2, H), "float32")  # [step parity, unit]: read one, write the other
        self.c = T.alloc_buffer((H,), "float32") if spec.kind == "LSTM" else None
        self.g = T.alloc_buffer((G,), "float32")  # the gates' pre-activations
        self.lbr = spec.linear_before_reset
        self.gated = T.alloc_buffer((H,), "float32") if spec.kind == "GRU" and not self.lbr else None

    def run(self) -> None:
        from tvm import tirx

        spec, a, d, b, T = self.spec, self.args, self.d, self.b, self.T
        zero = tirx.const(0.0, "float32")

        def start(m):
            T.buffer_store(self.h, a["initial_h"][d, b, m] if a["initial_h"] is not None else zero, [0, m])
            if self.c is not None:
                T.buffer_store(self.c, a["initial_c"][d, b, m] if a["initial_c"] is not None else zero, [m])
        self.vector_loop(0, spec.hidden, start)
        with T.serial(0, spec.steps) as step:
            last = spec.steps - 1
            t = step if spec.reverse == (False,) else last - step if spec.reverse == (True,) else (
                tirx.Select(d == 0, step, last - step))
            for phase in self.phases():
                if spec.parts == 1:
                    phase(t, step % 2, 0)
                else:  # each phase a parallel region: the next reads what every thread wrote
                    with T.parallel(0, spec.parts) as part:
                        phase(t, step % 2, part * self.units)

        def finish(m):
            T.buffer_store(a["y_h"], self.h[spec.steps % 2, m], [d, b, m])
            if self.c is not None:
                T.buffer_store(a["y_c"], self.c[m], [d, b, m])
        self.vector_loop(0, spec.hidden, finish)

    def phases(self) -> list:
        """A step's work for hidden units [first, first + units), as ``phase(t, cur, first)``
        calls that read h[cur] and in the end write h[1 - cur] and Y: one, or for a GRU without
        linear_before_reset two (its candidate's product reads every unit's r * h)."""
        def write_y(t, cur, first):
            self.vector_loop(first, self.units, lambda m: self.T.buffer_store(
                self.args["y"], self.h[1 - cur, m], [t, self.d, self.b, m]))

        if self.spec.kind == "GRU" and not self.lbr:
            def reset(t, cur, first):
                self.load_gates(t, first)
                self.gru_reset(cur, first)

            def update(t, cur, first):
                self.gru_update(t, cur, first)
                write_y(t, cur, first)
            return [reset, update]

        def step(t, cur, first):
            self.load_gates(t, first)
            {"LSTM": self.lstm_step, "GRU": self.gru_update, "RNN": self.rnn_step}[self.spec.kind](t, cur, first)
            write_y(t, cur, first)
        return [step]

    # ------------------------------------------------------------------ loops and expressions
    def lanes(self, count: int) -> int:
        """The widest vector, of the CPU's lanes or fewer, that divides ``count`` (1: none does)."""
        return widest_lanes(count, self.vector_lanes) or 1

    def vector_loop(self, first, count: int, body) -> None:
        """``body(i)`` for i in [first, first + count), ``lanes(count)`` at a time."""
        lanes = self.lanes(count)
        with self.T.serial(0, count // lanes) as outer:
            with self.T.vectorized(0, lanes) as inner:
                body(first + outer * lanes + inner)

    def gate_columns(self, first, gates: range):
        """(first column, count) ranges of gates ``gates`` for this thread's units: the gates'
        columns in one range where one thread has all the units."""
        H = self.spec.hidden
        if self.units == H:
            return [(gates.start * H, len(gates) * H)]
        return [(k * H + first, self.units) for k in gates]

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

    def load_gates(self, t, first) -> None:
        """g = the step's input terms (GRU with linear_before_reset: the candidate's columns start
        from its recurrent bias instead; the input term is added after the reset gate)."""
        from tvm import tirx

        H = self.spec.hidden
        if self.lbr:
            value = lambda j: tirx.Select(j < 2 * H, self.projected(t, j),  # noqa: E731
                                          self.args["candidate_bias"][self.d, tirx.max(j - 2 * H, 0)])
        else:
            value = lambda j: self.projected(t, j)  # noqa: E731
        for start, count in self.gate_columns(first, range(GATES[self.spec.kind])):
            self.vector_loop(start, count, lambda j: self.T.buffer_store(self.g, value(j), [j]))

    def recurrent_product(self, state, first, gates: range) -> None:
        """g[columns] += state . weights[d, :, columns] for gates ``gates`` of this thread's
        units, one block of gate vectors at a time (``column_block``), each block's accumulators
        kept over the whole sum while its packed weights stream by in order."""
        T, weights, block = self.T, self.args["recurrent"], self.block
        lanes = self.lanes(block)
        for start, count in self.gate_columns(first, gates):
            with T.serial(0, count // block) as part:
                with T.serial(0, self.spec.hidden) as k:
                    with T.unroll(0, block // lanes) as vector:
                        with T.vectorized(0, lanes) as lane:
                            column = vector * lanes + lane
                            j = start + part * block + column
                            T.buffer_store(self.g, self.g[j] + state(k) * weights[
                                self.d, start // block + part, k, column], [j])

    # ------------------------------------------------------------------ the three kinds
    def lstm_step(self, t, cur, first) -> None:
        """c = f * c + i * g(c~); h = o * h(c): gates i, o, f, c~ in ONNX's order, peepholes on
        the old cell for i and f and on the new one for o."""
        H, g, c = self.spec.hidden, self.g, self.c
        self.recurrent_product(lambda k: self.h[cur, k], first, range(4))

        def peeped(m, k: int):
            peep = self.args["peepholes"]
            return g[k * H + m] if peep is None else g[k * H + m] + peep[self.d, k * H + m] * c[m]

        def update_cell(m):
            i = self.activate(peeped(m, 0), 0)
            f = 1.0 - i if self.spec.input_forget else self.activate(peeped(m, 2), 0)
            self.T.buffer_store(c, f * c[m] + i * self.activate(g[3 * H + m], 1), [m])

        def update_hidden(m):
            self.T.buffer_store(self.h, self.activate(peeped(m, 1), 0) * self.activate(c[m], 2, clipped=False),
                                [1 - cur, m])

        self.vector_loop(first, self.units, update_cell)
        self.vector_loop(first, self.units, update_hidden)

    def gru_reset(self, cur, first) -> None:
        """Without linear_before_reset, the first phase: z and r's products, then r * h for this
        thread's units (the candidate's product in the next phase reads all of them)."""
        g, h = self.g, self.h
        self.recurrent_product(lambda k: h[cur, k], first, range(2))
        self.vector_loop(first, self.units, lambda m: self.T.buffer_store(
            self.gated, self.activate(g[self.spec.hidden + m], 0) * h[cur, m], [m]))

    def gru_update(self, t, cur, first) -> None:
        """z and r from the first two gates; the candidate from the input's third gate and either
        r * (h R_h + Rb_h) (linear_before_reset: one product by all three gates' weights) or
        (r * h) R_h (its bias folded into the input's; r * h from ``gru_reset``);
        h = (1 - z) * candidate + z * h."""
        H, g, h = self.spec.hidden, self.g, self.h
        if self.lbr:
            self.recurrent_product(lambda k: h[cur, k], first, range(3))

            def candidate(m):
                return self.activate(self.projected(t, 2 * H + m) + self.activate(g[H + m], 0) * g[2 * H + m], 1)
        else:
            self.recurrent_product(lambda k: self.gated[k], first, range(2, 3))

            def candidate(m):
                return self.activate(g[2 * H + m], 1)

        def update(m):
            z = self.activate(g[m], 0)
            self.T.buffer_store(h, (1.0 - z) * candidate(m) + z * h[cur, m], [1 - cur, m])
        self.vector_loop(first, self.units, update)

    def rnn_step(self, t, cur, first) -> None:
        self.recurrent_product(lambda k: self.h[cur, k], first, range(1))
        self.vector_loop(first, self.units, lambda m: self.T.buffer_store(
            self.h, self.activate(self.g[m], 0), [1 - cur, m]))


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


def column_block(spec: LoopSpec, unit: VectorUnit) -> int:
    """Gate columns accumulated in registers at once, and the width the recurrent weights are
    packed by: as many vectors as the registers hold beside the operands, dividing every range of
    columns a product runs over (``gate_columns``: all gates' columns at once where one thread has
    every unit and one product takes every gate; one gate's where a GRU's phases split them; a
    thread's units of each gate where steps are split), so that each range is whole blocks. Packed, a
    thread reads its weights in one stream; transposed only ([D, H, G]), each of the H rows of a
    block was a jump of G floats, a new page for the prefetchers every 128-512 bytes: a streaming
    LSTM of 256 units (1 MB of weights a step, split between 2 cores) ran 10.6 us a step where ONNX
    Runtime took 7.7 (AMD Zen 5)."""
    if spec.parts > 1:
        span = spec.hidden // spec.parts
    elif spec.kind == "GRU" and not spec.linear_before_reset:
        span = spec.hidden
    else:
        span = spec.gates
    lanes = widest_lanes(span, unit.lanes) or 1
    return lanes * _largest_divisor(span // lanes, max(1, unit.registers - 6))


def pack_recurrent(recurrent: np.ndarray, block: int) -> np.ndarray:
    """ONNX's recurrent weights [D, G, H] as the loop kernel reads them: [D, G/block, H, block]."""
    D, G, H = recurrent.shape
    return recurrent.reshape(D, G // block, block, H).transpose(0, 1, 3, 2)


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

    def as_kernel_reads(state):  # [B, D, H] (batch-first) -> [D, B, H], in float32 (the input: [B, T, I])
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
    sequence = as_kernel_reads(x)  # [B, T, I] (batch-first) -> [T, B, I], in float32
    projection = weights.transpose(2, 0, 1).reshape(weights.shape[-1], D * G)  # [I, D*G]
    args = [relax.op.matmul(sequence, const(projection)), const(folded.reshape(-1)), const(pack_recurrent(recurrent, column_block(spec, unit)))]
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
    return dataclasses.replace(spec, parts=_parts(spec, physical_cores())), weights, recurrent, bias, peepholes


def _parts(spec: LoopSpec, cores: int) -> int:
    """Threads to share each step's hidden units: 1 where the layer's jobs (directions x batch
    entries) already occupy the cores or a step is too little work for a parallel region; else
    the most, up to the idle cores, that leave each a whole number of 4-lane vectors of units."""
    jobs = spec.directions * spec.batch
    if jobs >= cores or spec.hidden * spec.gates < SPLIT_WORK:
        return 1
    return max(p for p in range(1, cores // jobs + 1) if spec.hidden % (4 * p) == 0)
