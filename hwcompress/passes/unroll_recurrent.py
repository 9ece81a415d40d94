"""Unroll LSTM, GRU and RNN layers (OCR recognizers, keyword spotters, sequence heads) into
MatMuls and elementwise ops over their static sequence length.

TVM's ONNX frontend imports none of the three ("unsupported op LSTM"). On CPUs the importer runs
each as one loop kernel (``backend.recurrent_loops``: an unrolled 80-step BiLSTM was hundreds of
small kernels, VM-bound); GPU targets get this form, which their rule-based schedules take.
Unrolled, each layer is one MatMul projecting every time step's input at once (``X W^T`` plus
both biases: the large, parallel part), then per step and direction one MatMul by the recurrent weights and the gates'
elementwise ops, which TVM fuses. Zero initial states drop the first step's recurrent MatMul.
Every attribute of the ONNX definitions is honoured (directions, batch-first layout, peepholes,
clip, coupled input-forget gate, GRU's linear_before_reset, activations with their alpha/beta);
a layer whose weights are not constant, whose sequence lengths vary per batch entry, or whose
sequence length is not static is left as it is, with the reason. Exact up to float rounding
(the sums are grouped differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.graph import Graph
from ..model.recurrent import DEFAULT_ACTIVATIONS, GATES, activations, direction, why_not_compilable
from .base import PassLog, model_pass


@model_pass
def unroll_recurrent(graph: Graph, log: PassLog) -> None:
    for node in list(graph.nodes):
        if node.op_type not in GATES or node.domain not in ("", "ai.onnx"):
            continue
        why = why_not_compilable(graph, node)
        if why:
            log.skipped.append(f"{node.name}: {why}")
            continue
        steps = _Layer(graph, node).unroll()
        log.applied.append(f"{node.name}: {node.op_type} unrolled over {steps} steps")


@dataclass
class _Direction:
    index: int
    reverse: bool
    activations: list


class _Layer:
    """Emits the unrolled form of one recurrent node, in place of it."""

    def __init__(self, graph: Graph, node):
        self.graph, self.node, self.nodes = graph, node, []
        self.constants: dict[tuple, str] = {}
        self.kind = node.op_type
        self.dtype = graph.initializer(node.input[1]).dtype
        self.inputs = list(node.input) + [""] * (8 - len(node.input))
        self.hidden = int(graph.attr(node, "hidden_size", 0)) or graph.initializer(node.input[2]).shape[-1]
        self.clip = graph.attr(node, "clip", None)
        self.batch_first = bool(graph.attr(node, "layout", 0))
        per = len(DEFAULT_ACTIVATIONS[self.kind])
        acts = activations(graph, node)
        reverses = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction(graph, node)]
        self.directions = [_Direction(d, rev, acts[d * per:(d + 1) * per]) for d, rev in enumerate(reverses)]

    # ------------------------------------------------------------------ emission helpers
    def op(self, op_type: str, inputs, hint: str, **attrs) -> str:
        out = self.graph.unique_name(f"{self.node.name}_{hint}")
        self.nodes.append(self.graph.make_node(op_type, inputs, [out], name=f"{self.node.name}_{hint}", **attrs))
        return out

    def const(self, hint: str, value) -> str:
        """An initializer holding ``value``, one per distinct value (steps share their constants)."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.constants:
            self.constants[key] = self.graph.add_initializer(f"{self.node.name}_{hint}", value)
        return self.constants[key]

    def scalar(self, value: float):
        return np.array(value, self.dtype)

    def ints(self, *values: int) -> str:
        return self.const("i", np.array(values, np.int64))

    def reshape(self, tensor: str, shape: list[int], hint: str) -> str:
        return self.op("Reshape", [tensor, self.ints(*shape)], hint)

    def take(self, tensor: str, index: int, axis: int, hint: str) -> str:
        """``tensor[index:index+1]`` along ``axis``."""
        return self.op("Slice", [tensor, self.ints(index), self.ints(index + 1), self.ints(axis)], hint)

    def gate(self, tensor: str, k: int, hint: str) -> str:
        """Gate ``k``'s H columns of ``tensor`` [1, 1, B, gates*H]."""
        h = self.hidden
        return self.op("Slice", [tensor, self.ints(k * h), self.ints((k + 1) * h), self.ints(-1)], hint)

    def activate(self, tensor: str, activation, hint: str, clipped: bool = True) -> str:
        if clipped and self.clip is not None:
            limit = float(self.clip)
            tensor = self.op("Clip", [tensor, self.const("lo", self.scalar(-limit)),
                                      self.const("hi", self.scalar(limit))], f"{hint}_clip")
        op, alpha, beta = activation
        if op == "Affine":
            return self.op("Add", [self.op("Mul", [tensor, self.const("a", self.scalar(alpha))], f"{hint}_scale"),
                                   self.const("b", self.scalar(beta))], hint)
        if op == "ScaledTanh":
            inner = self.op("Mul", [tensor, self.const("b", self.scalar(beta))], f"{hint}_in")
            return self.op("Mul", [self.op("Tanh", [inner], f"{hint}_tanh"), self.const("a", self.scalar(alpha))], hint)
        attrs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
        return self.op(op, [tensor], hint, **attrs)

    # ------------------------------------------------------------------ the layer
    def unroll(self) -> int:
        g, node, inputs = self.graph, self.node, self.inputs
        steps, batch = g.shape(node.input[0])[:2][::-1] if self.batch_first else g.shape(node.input[0])[:2]
        self.batch = batch
        # Steps work on [1, 1, B, ...] tensors: the MatMuls by constant weights then run as 1x1 convs
        # over that image as it is, with no reshape between them and the ops after.
        x = inputs[0]
        if self.batch_first:
            x = self.op("Transpose", [x], "time_major", perm=[1, 0, 2])
        x = self.op("Unsqueeze", [x, self.ints(0)], "image")  # [1, T, B, I]
        weights, recurrent = g.initializer(inputs[1]), g.initializer(inputs[2])
        bias = g.initializer(inputs[3]) if inputs[3] else np.zeros((len(self.directions), 2 * recurrent.shape[1]),
                                                                    weights.dtype)
        ys, hs, cs = [], [], []
        for d in self.directions:
            outs = self.direction(d, x, steps, weights[d.index], recurrent[d.index], bias[d.index])
            ys.append(outs[0])
            hs.append(outs[1])
            cs.append(outs[2])
        self.outputs(ys, hs, cs)
        g.replace_node(node, self.nodes)
        return steps

    def direction(self, d: _Direction, x: str, steps: int, w, r, b):
        """One direction's steps; (its H per time index, last H, last C)."""
        h = self.hidden
        gates = GATES[self.kind]
        w_bias, r_bias = b[:gates * h], b[gates * h:]
        # Recurrent biases that sit inside GRU's reset product stay with the recurrent term.
        inner = self.kind == "GRU"
        lbr = inner and bool(self.graph.attr(self.node, "linear_before_reset", 0))
        input_bias = w_bias + (np.concatenate([r_bias[:2 * h], np.zeros(h, b.dtype)]) if inner else r_bias)
        projected = self.op("Add", [self.op("MatMul", [x, self.const("Wt", np.ascontiguousarray(w.T))],
                                            f"d{d.index}_x_proj"),
                                    self.const("bias", input_bias.astype(w.dtype))], f"d{d.index}_x_gates")
        state = [self.initial(5, d), self.initial(6, d) if self.kind == "LSTM" else None]
        outputs = [None] * steps
        order = range(steps - 1, -1, -1) if d.reverse else range(steps)
        for t in order:
            x_t = self.take(projected, t, 1, f"d{d.index}_x{t}")
            step = {"LSTM": self.lstm_step, "GRU": self.gru_step, "RNN": self.rnn_step}[self.kind]
            state = step(d, x_t, state, r, r_bias, lbr, f"d{d.index}_t{t}")
            outputs[t] = state[0]
        return outputs, state[0], state[1]

    def initial(self, index: int, d: _Direction) -> str | None:
        name = self.inputs[index]
        if not name:
            return None
        state = self.take(name, d.index, int(self.batch_first), f"d{d.index}_init{index}")  # [1, B, H] or [B, 1, H]
        return self.reshape(state, [1, 1, self.batch, self.hidden], f"d{d.index}_init{index}_4d")

    def gate_sum(self, rec: str | None, x_t: str, k: int, hint: str) -> str:
        """Gate ``k``'s pre-activation: its columns of the recurrent product (absent: a zero
        state) plus its columns of the input projection. Summed per gate, after the slices, the
        slices of both fuse into the gates' kernels: three kernels a step (a sum before the slices
        became the product's epilogue and left the projection's slice a copy kernel of its own;
        the same time on an 80-step BiLSTM, where the VM's calls per kernel dominate, one kernel
        fewer to build and call)."""
        x_k = self.gate(x_t, k, f"{hint}_x")
        return x_k if rec is None else self.op("Add", [self.gate(rec, k, f"{hint}_r"), x_k], hint)

    def recurrent(self, h_prev: str | None, r, rows: slice, hint: str) -> str | None:
        if h_prev is None:
            return None
        return self.op("MatMul", [h_prev, self.const("Rt", np.ascontiguousarray(r[rows].T))], hint)

    def lstm_step(self, d, x_t, state, r, r_bias, lbr, hint):
        h_prev, c_prev = state
        f_act, g_act, h_act = d.activations
        rec = self.recurrent(h_prev, r, slice(None), f"{hint}_rec")
        peep = self.graph.initializer(self.inputs[7])[d.index] if self.inputs[7] else None
        H = self.hidden

        def peephole(gate: str, k: int, cell: str | None) -> str:
            if peep is None or cell is None:
                return gate
            weight = self.const("P", peep[k * H:(k + 1) * H])
            return self.op("Add", [gate, self.op("Mul", [cell, weight], f"{hint}_peep{k}")], f"{hint}_peeped{k}")

        i = self.activate(peephole(self.gate_sum(rec, x_t, 0, f"{hint}_i_pre"), 0, c_prev), f_act, f"{hint}_i")
        if self.graph.attr(self.node, "input_forget", 0):
            f = self.op("Sub", [self.const("one", self.scalar(1)), i], f"{hint}_f")
        else:
            f = self.activate(peephole(self.gate_sum(rec, x_t, 2, f"{hint}_f_pre"), 2, c_prev), f_act, f"{hint}_f")
        candidate = self.activate(self.gate_sum(rec, x_t, 3, f"{hint}_c_pre"), g_act, f"{hint}_g")
        c = self.op("Mul", [i, candidate], f"{hint}_ig")
        if c_prev is not None:
            c = self.op("Add", [self.op("Mul", [f, c_prev], f"{hint}_fc"), c], f"{hint}_c")
        o = self.activate(peephole(self.gate_sum(rec, x_t, 1, f"{hint}_o_pre"), 1, c), f_act, f"{hint}_o")
        h = self.op("Mul", [o, self.activate(c, h_act, f"{hint}_hc", clipped=False)], f"{hint}_h")
        return [h, c]

    def gru_step(self, d, x_t, state, r, r_bias, lbr, hint):
        h_prev = state[0]
        f_act, g_act = d.activations
        H = self.hidden
        # linear_before_reset: one product by all three gates' weights; else the candidate's
        # product reads r * H_{t-1}, so it is a second product after the first two gates'.
        rec_zr = self.recurrent(h_prev, r, slice(None) if lbr else slice(0, 2 * H), f"{hint}_rec")
        z = self.activate(self.gate_sum(rec_zr, x_t, 0, f"{hint}_z_pre"), f_act, f"{hint}_z")
        reset = self.activate(self.gate_sum(rec_zr, x_t, 1, f"{hint}_r_pre"), f_act, f"{hint}_r")
        x_h = self.gate(x_t, 2, f"{hint}_xh")
        rh_bias = self.const("Rbh", r_bias[2 * H:])
        if h_prev is None:
            # H_{t-1} = 0: the recurrent term of the candidate is its bias (times r where linear_before_reset).
            rec = self.op("Mul", [reset, rh_bias], f"{hint}_rh") if lbr else rh_bias
        elif lbr:
            rec = self.op("Mul", [reset, self.op("Add", [self.gate(rec_zr, 2, f"{hint}_rec_h"), rh_bias],
                                                 f"{hint}_rec_hb")], f"{hint}_rh")
        else:
            gated = self.op("Mul", [reset, h_prev], f"{hint}_rhp")
            rec = self.op("Add", [self.recurrent(gated, r, slice(2 * H, 3 * H), f"{hint}_rec_h"), rh_bias], f"{hint}_rh")
        candidate = self.activate(self.op("Add", [x_h, rec], f"{hint}_h_pre"), g_act, f"{hint}_g")
        # H_t = (1 - z) * candidate + z * H_{t-1} = candidate + z * (H_{t-1} - candidate)
        if h_prev is None:
            h = self.op("Sub", [candidate, self.op("Mul", [z, candidate], f"{hint}_zc")], f"{hint}_h")
        else:
            h = self.op("Add", [candidate, self.op("Mul", [z, self.op("Sub", [h_prev, candidate], f"{hint}_diff")],
                                                   f"{hint}_zd")], f"{hint}_h")
        return [h, None]

    def rnn_step(self, d, x_t, state, r, r_bias, lbr, hint):
        rec = self.recurrent(state[0], r, slice(None), f"{hint}_rec")
        return [self.activate(x_t if rec is None else self.op("Add", [rec, x_t], f"{hint}_pre"), d.activations[0],
                              f"{hint}_h"), None]

    def outputs(self, ys: list[list[str]], hs: list[str], cs: list[str | None]) -> None:
        """Y [T, D, B, H] (or [B, T, D, H] batch-first), Y_h and Y_c [D, B, H] (or [B, D, H])."""
        g = self.graph
        names = [n if n and (g.consumers(n) or n in g.output_names) else ""
                 for n in list(self.node.output) + [""] * (3 - len(self.node.output))]
        if names[0]:
            shape = [len(ys[0]), 1, self.batch, self.hidden]
            per_direction = [self.reshape(self.op("Concat", y, f"y_dir{i}", axis=1), shape, f"y_dir{i}_t")
                             for i, y in enumerate(ys)]
            self.finish(per_direction, 1, [2, 0, 1, 3], names[0])
        for name, states in ((names[1], hs), (names[2], cs)):
            if name:
                self.finish([self.reshape(s, [1, self.batch, self.hidden], "last") for s in states], 0, [1, 0, 2], name)

    def finish(self, parts: list[str], axis: int, batch_first_perm: list[int], name: str) -> None:
        """Concatenate the directions' parts along ``axis`` into output ``name`` (batch-first: transposed)."""
        whole = parts[0] if len(parts) == 1 else self.op("Concat", parts, "directions", axis=axis)
        if self.batch_first:
            whole = self.op("Transpose", [whole], "batch_first", perm=batch_first_perm)
        for n in self.nodes:  # ``whole`` takes the output's name (other steps may read it too)
            n.output[:] = [name if o == whole else o for o in n.output]
            n.input[:] = [name if i == whole else i for i in n.input]
