#!/usr/bin/env python3
"""TVM / ONNX Runtime fp32, untuned, for one block of each layer kind deployed models are built of.

    python tools/bench_ops.py [--ops deconv,grouped,...] [--trials 0]

Each block is a few layers at a size such models run them (random weights), written as exporters
write them: 1-D convs over raw audio, transposed convs (4x4 stride 2, depthwise), grouped convs
(ResNeXt, RegNet, ShuffleNetV1), a depthwise conv with a channel multiplier, dilated and 1x7/7x1
convs, a reflect-padded conv, Mish, a segmentation softmax over classes, squeeze-and-excitation
written with ReduceMean, a ConvNeXt-style block (LayerNorm, MLP, GELU), InstanceNorm, a CRNN-style
text recognizer's convs and classifier, a bidirectional LSTM, a streaming unidirectional LSTM and a
GRU (loop kernels), self-attention (one head; ViT-Tiny's three; Swin's 64 windows x 3 heads;
written with Einsum), a MobileViT block (convs, the map unfolded into patches, two transformer
layers, folded back), LayerNorms written out in elementary ops (exports below opset 17), an MLP
with GELU's tanh form. Each is compiled by hwc for this machine (``--trials``: tuning budget,
default 0: the project's own schedules and default schedules alone), checked against ONNX Runtime,
and both timed in alternating rounds in this process. A block the compile refuses prints its
one-line error. Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cpu_description, side_by_side  # noqa: E402

from hwcompress.compile import CompileOptions, compile_model  # noqa: E402
from hwcompress.config import physical_cores  # noqa: E402
from hwcompress.errors import HwcError  # noqa: E402
from hwcompress.model import reference as ort  # noqa: E402


class _Block:
    """Nodes and seeded He-scaled weights of one block, finished into a checked model."""

    def __init__(self, seed: int = 0):
        self.rng, self.nodes, self.weights, self.count = np.random.default_rng(seed), [], [], 0

    def const(self, array, dtype=np.float32) -> str:
        self.count += 1
        self.weights.append(numpy_helper.from_array(np.asarray(array, dtype), f"c{self.count}"))
        return f"c{self.count}"

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        self.nodes.append(helper.make_node(op_type, inputs, [f"t{self.count}"], **attrs))
        return f"t{self.count}"

    def conv(self, x: str, cin: int, cout: int, kernel, group: int = 1, **attrs) -> str:
        kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel, kernel)
        fan_in = cin // group * int(np.prod(kernel))
        w = self.rng.normal(0, np.sqrt(2 / fan_in), (cout, cin // group, *kernel))
        return self.op("Conv", [x, self.const(w), self.const(self.rng.normal(0, 0.1, cout))], group=group, **attrs)

    def model(self, y: str, input_shape: list[int]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], self.weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # The output's shape as ONNX Runtime computes it: exporters write it, and hwc expects it.
        out = ort.run(model, {"x": np.zeros(input_shape, np.float32)})[0]
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info(y, TensorProto.FLOAT, list(out.shape)))
        return model


def conv1d():
    b = _Block()
    y = b.op("MaxPool", [b.op("Relu", [b.conv("x", 1, 64, (80,), strides=[4], pads=[38, 38])])],
             kernel_shape=[4], strides=[4])
    for _ in range(3):
        y = b.op("Relu", [b.conv(y, 64, 64, (3,), pads=[1, 1])])
    return b.model(y, [1, 1, 16000])


def deconv():
    b = _Block()
    w = b.rng.normal(0, 0.1, (64, 32, 4, 4))
    return b.model(b.op("Relu", [b.op("ConvTranspose", ["x", b.const(w)], strides=[2, 2], pads=[1] * 4)]),
                   [1, 64, 56, 56])


def depthwise_deconv():
    b = _Block()
    w = b.rng.normal(0, 0.1, (64, 1, 4, 4))
    return b.model(b.op("Relu", [b.op("ConvTranspose", ["x", b.const(w)], strides=[2, 2], pads=[1] * 4, group=64)]),
                   [1, 64, 56, 56])


def resnext():
    b = _Block()
    y = b.op("Relu", [b.conv("x", 256, 128, 1)])
    y = b.op("Relu", [b.conv(y, 128, 128, 3, group=32, pads=[1] * 4)])
    return b.model(b.op("Add", [b.conv(y, 128, 256, 1), "x"]), [1, 256, 28, 28])


def regnet():
    b = _Block()
    y = b.op("Relu", [b.conv("x", 192, 192, 1)])
    y = b.op("Relu", [b.conv(y, 192, 192, 3, group=12, pads=[1] * 4)])
    return b.model(b.op("Relu", [b.op("Add", [b.conv(y, 192, 192, 1), "x"])]), [1, 192, 28, 28])


def shufflenet_v1():
    b = _Block()
    return b.model(b.op("Relu", [b.conv("x", 240, 240, 1, group=3)]), [1, 240, 28, 28])


def channel_multiplier():
    b = _Block()
    return b.model(b.op("Relu", [b.conv("x", 32, 64, 3, group=32, pads=[1] * 4)]), [1, 32, 56, 56])


def dilated():
    b = _Block()
    return b.model(b.op("Relu", [b.conv("x", 256, 256, 3, dilations=[2, 2], pads=[2] * 4)]), [1, 256, 28, 28])


def inception_1x7():
    b = _Block()
    y = b.op("Relu", [b.conv("x", 128, 128, (1, 7), pads=[0, 3, 0, 3])])
    return b.model(b.op("Relu", [b.conv(y, 128, 128, (7, 1), pads=[3, 0, 3, 0])]), [1, 128, 17, 17])


def reflect_pad():
    b = _Block()
    y = b.op("Pad", ["x", b.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], mode="reflect")
    return b.model(b.op("Relu", [b.conv(y, 32, 32, 3)]), [1, 32, 128, 128])


def mish():
    b = _Block()
    y = b.conv("x", 64, 64, 3, pads=[1] * 4)
    return b.model(b.op("Mul", [y, b.op("Tanh", [b.op("Softplus", [y])])]), [1, 64, 56, 56])


def segmentation_softmax():
    b = _Block()
    return b.model(b.op("Softmax", [b.conv("x", 64, 21, 1)], axis=1), [1, 64, 128, 128])


def reducemean_se():
    b = _Block()
    y = b.op("Relu", [b.conv("x", 96, 96, 3, pads=[1] * 4)])
    m = b.op("ReduceMean", [y], axes=[2, 3], keepdims=1)
    s = b.op("Sigmoid", [b.conv(b.op("Relu", [b.conv(m, 96, 24, 1)]), 24, 96, 1)])
    return b.model(b.op("Mul", [y, s]), [1, 96, 28, 28])


def convnext():
    b = _Block()
    y = b.op("Transpose", [b.conv("x", 96, 96, 7, group=96, pads=[3] * 4)], perm=[0, 2, 3, 1])
    y = b.op("LayerNormalization", [y, b.const(np.ones(96)), b.const(np.zeros(96))], axis=-1)
    y = b.op("MatMul", [y, b.const(b.rng.normal(0, 0.1, (96, 384)))])
    y = b.op("Mul", [y, b.op("Sigmoid", [b.op("Mul", [y, b.const(1.702)])])])
    y = b.op("Transpose", [b.op("MatMul", [y, b.const(b.rng.normal(0, 0.05, (384, 96)))])], perm=[0, 3, 1, 2])
    return b.model(b.op("Add", [y, "x"]), [1, 96, 28, 28])


def instance_norm():
    b = _Block()
    y = b.op("InstanceNormalization", [b.conv("x", 32, 32, 3, pads=[1] * 4), b.const(np.ones(32)), b.const(np.zeros(32))])
    return b.model(b.op("Relu", [y]), [1, 32, 128, 128])


def crnn():
    b = _Block()
    y = b.op("MaxPool", [b.op("Relu", [b.conv("x", 3, 32, 3, pads=[1] * 4)])], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MaxPool", [b.op("Relu", [b.conv(y, 32, 64, 3, pads=[1] * 4)])], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MaxPool", [b.op("Relu", [b.conv(y, 64, 128, 3, pads=[1] * 4)])], kernel_shape=[8, 1], strides=[8, 1])
    y = b.op("Transpose", [b.op("Squeeze", [y, b.const([2], np.int64)])], perm=[0, 2, 1])  # [1, 80 steps, 128]
    y = b.op("MatMul", [y, b.const(b.rng.normal(0, 0.1, (128, 97)))])
    return b.model(b.op("Softmax", [y], axis=-1), [1, 3, 32, 320])


def lstm():
    """A text recognizer's sequence model: a bidirectional LSTM over 80 column features."""
    b, hidden = _Block(), 128
    bound = 1 / np.sqrt(hidden)
    weights = [b.const(b.rng.uniform(-bound, bound, shape)) for shape in
               ((2, 4 * hidden, 256), (2, 4 * hidden, hidden), (2, 8 * hidden))]
    return b.model(b.op("LSTM", ["x", *weights], hidden_size=hidden, direction="bidirectional"), [80, 1, 256])


def lstm_stream():
    """A streaming speech model's layer: a unidirectional LSTM of 256 units over 100 frames at batch
    1 (one job: each step's units are shared among the cores)."""
    b, hidden = _Block(), 256
    bound = 1 / np.sqrt(hidden)
    weights = [b.const(b.rng.uniform(-bound, bound, shape)) for shape in
               ((1, 4 * hidden, 80), (1, 4 * hidden, hidden), (1, 8 * hidden))]
    return b.model(b.op("LSTM", ["x", *weights], hidden_size=hidden), [100, 1, 80])


def gru():
    """A keyword spotter's recurrent layer: a GRU over 49 frames of 40 mel features."""
    b, hidden = _Block(), 64
    bound = 1 / np.sqrt(hidden)
    weights = [b.const(b.rng.uniform(-bound, bound, shape)) for shape in
               ((1, 3 * hidden, 40), (1, 3 * hidden, hidden), (1, 6 * hidden))]
    return b.model(b.op("GRU", ["x", *weights], hidden_size=hidden, linear_before_reset=1), [49, 1, 40])


def attention():
    b = _Block()
    q = b.op("MatMul", ["x", b.const(b.rng.normal(0, 0.06, (256, 256)))])
    k = b.op("MatMul", ["x", b.const(b.rng.normal(0, 0.06, (256, 256)))])
    s = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])], axis=-1)
    return b.model(b.op("MatMul", [s, "x"]), [1, 196, 256])


def vit_attention():
    """A ViT-Tiny encoder's self-attention as PyTorch exports it: 3 heads of 64 over 197 tokens,
    scaled scores, softmax, heads joined, output projection."""
    b, tokens, heads, d = _Block(), 197, 3, 64
    width = heads * d

    def project(x):
        y = b.op("Add", [b.op("MatMul", [x, b.const(b.rng.normal(0, 0.06, (width, width)))]),
                         b.const(b.rng.normal(0, 0.02, width))])
        return b.op("Transpose", [b.op("Reshape", [y, b.const([1, tokens, heads, d], np.int64)])], perm=[0, 2, 1, 3])

    q, k, v = project("x"), project("x"), project("x")
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.const(d ** -0.5)])
    y = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const([1, tokens, width], np.int64)])
    return b.model(b.op("MatMul", [y, b.const(b.rng.normal(0, 0.06, (width, width)))]), [1, tokens, width])


def window_attention():
    """A Swin-T stage-1 window attention: 64 windows of 7x7 tokens, 3 heads of 32 (192 products)."""
    b, windows, tokens, heads, d = _Block(), 64, 49, 3, 32
    width = heads * d

    def project(x):
        y = b.op("MatMul", [x, b.const(b.rng.normal(0, 0.06, (width, width)))])
        return b.op("Transpose", [b.op("Reshape", [y, b.const([windows, tokens, heads, d], np.int64)])], perm=[0, 2, 1, 3])

    q, k, v = project("x"), project("x"), project("x")
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.const(d ** -0.5)])
    y = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const([windows, tokens, width], np.int64)])
    return b.model(b.op("MatMul", [y, b.const(b.rng.normal(0, 0.06, (width, width)))]), [windows, tokens, width])


def mobilevit():
    """A MobileViT block (CVNets' v1, stage 3 of MobileViT-XS): 3x3 and 1x1 convs, the 32x32 map
    unfolded into 2x2 patches (4 pixel positions x 256 patches), two transformer layers (LayerNorm,
    4-head attention with the scale on Q, SiLU MLP), folded back, 1x1 conv, concat, 3x3 conv."""
    b, c, d, h, heads, p = _Block(), 64, 96, 32, 4, 2
    n, hd = (h // p) ** 2, d // heads
    y = b.conv("x", c, c, 3, pads=[1] * 4)
    y = b.op("Mul", [y, b.op("Sigmoid", [y])])
    y = b.conv(y, c, d, 1)
    y = b.op("Reshape", [y, b.const([d, h // p, p, h // p, p], np.int64)])  # [d, 16, 2, 16, 2]
    y = b.op("Transpose", [y], perm=[2, 4, 1, 3, 0])  # [2, 2, 16, 16, d]
    t = b.op("Reshape", [y, b.const([p * p, n, d], np.int64)])  # [4, 256, 96]
    for layer in range(2):
        z = b.op("LayerNormalization", [t, b.const(np.ones(d)), b.const(np.zeros(d))], axis=-1)
        qkv = b.op("Add", [b.op("MatMul", [z, b.const(b.rng.normal(0, 0.1, (d, 3 * d)))]), b.const(b.rng.normal(0, 0.02, 3 * d))])
        qkv = b.op("Transpose", [b.op("Reshape", [qkv, b.const([p * p, n, 3, heads, hd], np.int64)])], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.op("Squeeze", [b.op("Slice", [qkv, b.const([i], np.int64), b.const([i + 1], np.int64), b.const([0], np.int64)]), b.const([0], np.int64)]) for i in range(3))
        q = b.op("Mul", [q, b.const(hd ** -0.5)])
        a = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
        o = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [a, v])], perm=[0, 2, 1, 3]), b.const([p * p, n, d], np.int64)])
        t = b.op("Add", [t, b.op("MatMul", [o, b.const(b.rng.normal(0, 0.1, (d, d)))])])
        z = b.op("LayerNormalization", [t, b.const(np.ones(d)), b.const(np.zeros(d))], axis=-1)
        z = b.op("MatMul", [z, b.const(b.rng.normal(0, 0.1, (d, 2 * d)))])
        z = b.op("Mul", [z, b.op("Sigmoid", [z])])
        t = b.op("Add", [t, b.op("MatMul", [z, b.const(b.rng.normal(0, 0.07, (2 * d, d)))])])
    y = b.op("Reshape", [t, b.const([p, p, h // p, h // p, d], np.int64)])
    y = b.op("Reshape", [b.op("Transpose", [y], perm=[4, 2, 0, 3, 1]), b.const([1, d, h, h], np.int64)])
    y = b.conv(y, d, c, 1)
    y = b.op("Concat", ["x", y], axis=1)
    return b.model(b.conv(y, 2 * c, c, 3, pads=[1] * 4), [1, c, h, h])


def decomposed_layer_norm():
    """Two LayerNorms as exporters write them below opset 17 (ReduceMean, Sub, Pow, ReduceMean, Add,
    Sqrt, Div, Mul, Add) around a dense layer, over ViT-Tiny's 197 x 192."""
    b, d = _Block(), 192
    def ln(x):
        m = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
        c = b.op("Sub", [x, m])
        v = b.op("ReduceMean", [b.op("Pow", [c, b.const(2.0)])], axes=[-1], keepdims=1)
        y = b.op("Div", [c, b.op("Sqrt", [b.op("Add", [v, b.const(1e-6)])])])
        return b.op("Add", [b.op("Mul", [y, b.const(b.rng.uniform(0.5, 1.5, d))]), b.const(b.rng.normal(0, 0.1, d))])
    y = ln("x")
    y = b.op("MatMul", [y, b.const(b.rng.normal(0, 0.06, (d, d)))])
    return b.model(ln(y), [1, 197, d])


def gelu_tanh():
    """A GPT-2-style MLP over 197 tokens: GELU in its tanh form (x^3 inside), as ``approximate="tanh"``
    and older exports write it."""
    b, d = _Block(), 192
    h = b.op("Add", [b.op("MatMul", ["x", b.const(b.rng.normal(0, 0.07, (d, 4 * d)))]), b.const(b.rng.normal(0, 0.02, 4 * d))])
    inner = b.op("Mul", [b.op("Add", [h, b.op("Mul", [b.op("Pow", [h, b.const(3.0)]), b.const(0.044715)])]), b.const(np.sqrt(2 / np.pi))])
    g = b.op("Mul", [b.op("Mul", [h, b.const(0.5)]), b.op("Add", [b.op("Tanh", [inner]), b.const(1.0)])])
    return b.model(b.op("MatMul", [g, b.const(b.rng.normal(0, 0.04, (4 * d, d)))]), [1, 197, d])


def einsum_attention():
    """ViT-Tiny's attention written with einsum (``bihd,bjhd->bhij``), as torch.einsum exports it."""
    b, t, h, dd = _Block(), 197, 3, 64
    w = h * dd
    def proj(x):
        y = b.op("MatMul", [x, b.const(b.rng.normal(0, 0.06, (w, w)))])
        return b.op("Reshape", [y, b.const([1, t, h, dd], np.int64)])
    q, k, v = proj("x"), proj("x"), proj("x")
    s = b.op("Einsum", [q, k], equation="bihd,bjhd->bhij")
    p = b.op("Softmax", [s], axis=-1)
    y = b.op("Einsum", [p, v], equation="bhij,bjhd->bihd")
    y = b.op("Reshape", [y, b.const([1, t, w], np.int64)])
    return b.model(b.op("MatMul", [y, b.const(b.rng.normal(0, 0.06, (w, w)))]), [1, t, w])


BLOCKS = {f.__name__: f for f in (conv1d, deconv, depthwise_deconv, resnext, regnet, shufflenet_v1, channel_multiplier,
                                   dilated, inception_1x7, reflect_pad, mish, segmentation_softmax, reducemean_se,
                                   convnext, instance_norm, crnn, lstm, lstm_stream, gru, attention, vit_attention,
                                   window_attention, einsum_attention, mobilevit, decomposed_layer_norm, gelu_tanh)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(BLOCKS), help="comma-separated: " + ", ".join(BLOCKS))
    parser.add_argument("--trials", type=int, default=0, help="tuning trials per block (default 0)")
    parser.add_argument("--cache-dir", type=Path, help="tuning database (kept between runs)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    unknown = [name for name in args.ops.split(",") if name not in BLOCKS]
    if unknown:
        parser.error(f"unknown block(s): {', '.join(unknown)}")
    threads = physical_cores()
    print(f"CPU: {cpu_description()}; {threads} threads for both", flush=True)
    print(f"{'block':22} {'ORT ms':>8} {'TVM ms':>8} {'TVM/ORT':>8}  max rel. error")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.ops.split(","):
            path, out = Path(scratch) / f"{name}.onnx", Path(scratch) / f"out-{name}"
            onnx.save(BLOCKS[name](), path)
            try:
                report = compile_model(path, out, CompileOptions(target="host", tune_trials=args.trials,
                                                                  cache_dir=args.cache_dir, repeat=args.repeat))
            except HwcError as exc:
                print(f"{name:22} not compiled: {exc}", flush=True)
                continue
            ort_ms, tvm_ms, ratio = side_by_side(path, out / "model.so", threads, args.repeat)
            print(f"{name:22} {ort_ms:8.3f} {tvm_ms:8.3f} {ratio:8.2f}  {report['accuracy']['max_relative_error']:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
