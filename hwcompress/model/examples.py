"""Example models written by the project's own code: real structure, random weights.

They let a newcomer run hwc without downloading anything, and give tests and benchmarks standard
architectures with BatchNormalization still in place: classifiers (ResNet-18, MobileNetV2,
MobileNetV3-style with squeeze-and-excitation and HardSwish, ShuffleNet-style with channel split and
shuffle), a YOLO-style detector (Focus slicing, SiLU, SPP, upsampling), a U-Net-style segmenter
(ConvTranspose, Resize, skip concatenations), an audio CNN with a channels-last input, a 1-D CNN
over raw audio samples, a sub-pixel super-resolution net (pixel shuffle as Reshape/Transpose), a CRNN text
recognizer and a ViT-Tiny vision transformer. Weights are
He-scaled and BN statistics non-trivial, so activations stay in a realistic range and folding is exercised.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .loading import CANONICAL_OPSET


class _Builder:
    """Appends Conv/BN/activation nodes with fresh names and seeded random weights."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs) -> str:
        out = self._name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: str | None = "Relu") -> str:
        fan_in = cin // groups * k * k
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // groups, k, k))
        y = self.node("Conv", [x, self.const("w", w)], "conv", kernel_shape=[k, k], strides=[stride, stride],
                      pads=[k // 2] * 4, group=groups)
        bn_params = [self.rng.uniform(0.5, 1.5, cout), self.rng.normal(0, 0.1, cout),
                     self.rng.normal(0, 0.1, cout), self.rng.uniform(0.5, 1.5, cout)]
        y = self.node("BatchNormalization", [y] + [self.const("bn", p) for p in bn_params], "bn", epsilon=1e-5)
        return self.act(y, act)

    def act(self, y: str, act: str | None) -> str:
        """An activation as exporters write it (SiLU as Sigmoid x Mul, as PyTorch exports it)."""
        if act == "Relu":
            return self.node("Relu", [y], "relu")
        if act == "Relu6":
            return self.node("Clip", [y, self.const("lo", 0.0), self.const("hi", 6.0)], "relu6")
        if act == "SiLU":
            return self.node("Mul", [y, self.node("Sigmoid", [y], "sigmoid")], "silu")
        if act == "HardSwish":
            return self.node("HardSwish", [y], "hswish")
        if act == "LeakyRelu":
            return self.node("LeakyRelu", [y], "leaky", alpha=0.1)
        return y

    def const_int(self, prefix: str, values) -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, bias: bool = False) -> str:
        """A plain conv (no BN): heads and squeeze-and-excitation layers."""
        w = self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        inputs = [x, self.const("w", w)] + ([self.const("b", self.rng.normal(0, 0.1, cout))] if bias else [])
        return self.node("Conv", inputs, "conv", kernel_shape=[k, k], pads=[k // 2] * 4)

    def shuffle(self, x: str, channels: int, size: int, groups: int) -> str:
        """Channel shuffle as exporters write it: Reshape -> Transpose -> Reshape."""
        y = self.node("Reshape", [x, self.const_int("shape", [1, groups, channels // groups, size, size])], "shuffle")
        y = self.node("Transpose", [y], "shuffle_t", perm=[0, 2, 1, 3, 4])
        return self.node("Reshape", [y, self.const_int("shape", [1, channels, size, size])], "shuffle_r")

    def head(self, x: str, features: int, classes: int) -> str:
        y = self.node("GlobalAveragePool", [x], "gap")
        y = self.node("Flatten", [y], "flatten", axis=1)
        w = self.rng.normal(0, np.sqrt(1.0 / features), (classes, features))
        return self.node("Gemm", [y, self.const("fc_w", w), self.const("fc_b", self.rng.normal(0, 0.01, classes))],
                         "fc", transB=1)

    def model(self, name: str, x: str, y: str, input_size: int, classes: int,
              input_shape: list[int] | None = None, output_shape: list[int] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, input_shape or [1, 3, input_size, input_size])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, output_shape or [1, classes])], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", CANONICAL_OPSET)],
                                  producer_name="hwcompress.examples")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def resnet18(input_size: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 (He et al. 2016): BasicBlocks with residual Add and 1x1 downsampling."""
    b = _Builder(seed)
    c0 = max(8, int(64 * width))
    y = b.conv_bn("input", 3, c0, 7, stride=2)
    y = b.node("MaxPool", [y], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = c0
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = c0 * mult
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            z = b.conv_bn(y, cin, cout, 3, stride)
            z = b.conv_bn(z, cout, cout, 3, act=None)
            skip = y if stride == 1 and cin == cout else b.conv_bn(y, cin, cout, 1, stride, act=None)
            y = b.node("Relu", [b.node("Add", [z, skip], "add")], "relu")
            cin = cout
    return b.model("resnet18", "input", b.head(y, cin, classes), input_size, classes)


# (expansion t, output channels c, repeats n, first stride s), from Sandler et al. 2018, Table 2.
_MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2(input_size: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2: inverted residuals with depthwise 3x3 convs, ReLU6 and linear bottlenecks."""
    b = _Builder(seed)

    def ch(c: int) -> int:  # round to a multiple of 8 as the reference implementation does
        return max(8, int(c * width + 4) // 8 * 8)

    cin = ch(32)
    y = b.conv_bn("input", 3, cin, 3, stride=2, act="Relu6")
    for t, c, n, s in _MOBILENETV2_BLOCKS:
        cout = ch(c)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            z = b.conv_bn(y, cin, hidden, 1, act="Relu6") if t != 1 else y
            z = b.conv_bn(z, hidden, hidden, 3, stride, groups=hidden, act="Relu6")
            z = b.conv_bn(z, hidden, cout, 1, act=None)
            y = b.node("Add", [y, z], "add") if stride == 1 and cin == cout else z
            cin = cout
    last = max(1280, ch(1280)) if width > 1.0 else 1280
    y = b.conv_bn(y, cin, last, 1, act="Relu6")
    return b.model("mobilenetv2", "input", b.head(y, last, classes), input_size, classes)


def mobilenetv3(input_size: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-Small-style (Howard et al. 2019): depthwise 3x3/5x5, HardSwish, and
    squeeze-and-excitation (pool -> 1x1 -> ReLU -> 1x1 -> HardSigmoid -> scale)."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width + 4) // 8 * 8)  # noqa: E731
    cin = ch(16)
    y = b.conv_bn("input", 3, cin, 3, stride=2, act="HardSwish")
    # (kernel, expansion, out, squeeze-excite, activation, stride)
    for k, exp, c, se, act, s in ((3, 16, 16, True, "Relu", 2), (3, 72, 24, False, "Relu", 2),
                                  (5, 96, 40, True, "HardSwish", 2), (5, 240, 40, True, "HardSwish", 1),
                                  (5, 288, 96, True, "HardSwish", 2), (5, 576, 96, True, "HardSwish", 1)):
        hidden, cout = ch(exp), ch(c)
        z = b.conv_bn(y, cin, hidden, 1, act=act) if hidden != cin else y
        z = b.conv_bn(z, hidden, hidden, k, s, groups=hidden, act=act)
        if se:
            squeeze = ch(hidden // 4)
            g = b.node("GlobalAveragePool", [z], "se_pool")
            g = b.node("Relu", [b.conv(g, hidden, squeeze, 1, bias=True)], "se_relu")
            g = b.node("HardSigmoid", [b.conv(g, squeeze, hidden, 1, bias=True)], "se_gate", alpha=1 / 6, beta=0.5)
            z = b.node("Mul", [z, g], "se_scale")
        z = b.conv_bn(z, hidden, cout, 1, act=None)
        y = b.node("Add", [y, z], "add") if s == 1 and cin == cout else z
        cin = cout
    y = b.conv_bn(y, cin, ch(576), 1, act="HardSwish")
    return b.model("mobilenetv3", "input", b.head(y, ch(576), classes), input_size, classes)


def shufflenet(input_size: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """ShuffleNetV2-style (Ma et al. 2018): channel split, a depthwise branch, concat, channel shuffle."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    cin = ch(24)
    y = b.conv_bn("input", 3, cin, 3, stride=2)
    y = b.node("MaxPool", [y], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    size = input_size // 4
    for cout, repeats in ((ch(116), 3), (ch(232), 3), (ch(464), 2)):
        for i in range(repeats):
            if i == 0:  # downsampling unit: both branches see the whole input
                left = b.conv_bn(b.conv_bn(y, cin, cin, 3, 2, groups=cin, act=None), cin, cout // 2, 1)
                right = b.conv_bn(y, cin, cout // 2, 1)
                right = b.conv_bn(b.conv_bn(right, cout // 2, cout // 2, 3, 2, groups=cout // 2, act=None),
                                  cout // 2, cout // 2, 1)
                size = (size + 1) // 2
            else:
                half = cout // 2
                left = b.node("Split", [y, b.const_int("split", [half, half])], "split", axis=1)
                left, keep = left, left + "_b"
                b.nodes[-1].output[:] = [left, keep]
                right = b.conv_bn(b.conv_bn(b.conv_bn(keep, half, half, 1), half, half, 3, groups=half, act=None),
                                  half, half, 1)
            y = b.node("Concat", [left, right], "concat", axis=1)
            y = b.shuffle(y, cout, size, groups=2)
            cin = cout
    y = b.conv_bn(y, cin, ch(1024), 1)
    return b.model("shufflenet", "input", b.head(y, ch(1024), classes), input_size, classes)


def yolo(input_size: int = 320, classes: int = 80, width: float = 0.5, seed: int = 0) -> onnx.ModelProto:
    """YOLOv5/YOLOX-style detector: Focus slicing, conv + SiLU, residual bottlenecks, SPP max-pools,
    nearest upsampling with skip concatenations from strides 16 and 8, and a 1x1 head (boxes,
    objectness, classes) at stride 8. The output is the raw head map [1, 5 + classes, H/8, W/8]."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    quarters = []
    for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):  # Focus: space-to-depth by four strided slices
        quarters.append(b.node("Slice", ["input", b.const_int("st", [dy, dx]), b.const_int("en", [input_size] * 2),
                                         b.const_int("ax", [2, 3]), b.const_int("sp", [2, 2])], "focus"))
    y = b.conv_bn(b.node("Concat", quarters, "focus_cat", axis=1), 12, ch(32), 3, act="SiLU")
    y = b.conv_bn(y, ch(32), ch(64), 3, 2, act="SiLU")  # stride 4
    skips, cin = [], ch(64)
    for stage, c in enumerate((128, 256, 512)):
        cout = ch(c)
        y = b.conv_bn(y, cin, cout, 3, 2, act="SiLU")
        for _ in range(1 if stage < 2 else 1):
            z = b.conv_bn(b.conv_bn(y, cout, cout // 2, 1, act="SiLU"), cout // 2, cout, 3, act="SiLU")
            y = b.node("Add", [y, z], "bottleneck")
        skips.append(y)
        cin = cout
    half = cin // 2
    y = b.conv_bn(y, cin, half, 1, act="SiLU")  # SPP: max-pools of three sizes, concatenated
    pools = [b.node("MaxPool", [y], "spp", kernel_shape=[k, k], strides=[1, 1], pads=[k // 2] * 4) for k in (5, 9, 13)]
    y = b.conv_bn(b.node("Concat", [y] + pools, "spp_cat", axis=1), half * 4, cin, 1, act="SiLU")
    for skip, c in zip(reversed(skips[:-1]), (256, 128)):
        cout = ch(c)
        y = b.conv_bn(y, cin, cout, 1, act="SiLU")
        up = b.node("Resize", [y, b.const("roi", np.zeros(0)), b.const("scales", [1, 1, 2, 2])], "upsample",
                    mode="nearest")
        y = b.conv_bn(b.node("Concat", [up, skip], "neck_cat", axis=1), cout * 2, cout, 3, act="SiLU")
        cin = cout
    head = b.conv(y, cin, 5 + classes, 1, bias=True)
    stride8 = input_size // 8
    return b.model("yolo", "input", head, input_size, classes, output_shape=[1, 5 + classes, stride8, stride8])


def unet(input_size: int = 128, classes: int = 4, width: float = 0.5, seed: int = 0) -> onnx.ModelProto:
    """U-Net-style segmenter (Ronneberger et al. 2015): conv pairs, max-pool down, ConvTranspose up,
    skip concatenations, and a final bilinear Resize of the class map to the input size."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    y, cin, skips = "input", 3, []
    for c in (32, 64, 128):
        cout = ch(c)
        y = b.conv_bn(b.conv_bn(y, cin, cout, 3), cout, cout, 3)
        skips.append((y, cout))
        y = b.node("MaxPool", [y], "down", kernel_shape=[2, 2], strides=[2, 2])
        cin = cout
    y = b.conv_bn(y, cin, cin * 2, 3)
    cin *= 2
    for skip, c in reversed(skips):
        w = b.rng.normal(0, np.sqrt(2.0 / (cin * 4)), (cin, c, 2, 2))
        up = b.node("ConvTranspose", [y, b.const("up_w", w), b.const("up_b", b.rng.normal(0, 0.1, c))], "up",
                    kernel_shape=[2, 2], strides=[2, 2])
        y = b.conv_bn(b.conv_bn(b.node("Concat", [up, skip], "skip", axis=1), c * 2, c, 3), c, c, 3)
        cin = c
    y = b.conv(y, cin, classes, 1, bias=True)
    y = b.node("Resize", [y, b.const("roi", np.zeros(0)), b.const("scales", [1, 1, 2, 2])], "resize",
               mode="linear")
    return b.model("unet", "input", y, input_size, classes,
                   output_shape=[1, classes, input_size * 2, input_size * 2])


def audio_cnn(input_size: int = 98, classes: int = 128, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """A speech-embedding CNN over a log-mel spectrogram given channels-last ([1, frames, 40 mel
    bins, 1]) and transposed to NCHW inside: 3x1 and 1x3 kernels, LeakyRelu then Max with a
    constant after every conv (as such exports write a clamped activation), an embedding of ``classes``."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    y = b.node("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    cin = 1
    for c, (kh, kw), stride in ((32, (3, 1), 1), (32, (1, 3), 2), (64, (3, 1), 1), (64, (1, 3), 2), (128, (3, 3), 2)):
        cout = ch(c)
        w = b.rng.normal(0, np.sqrt(2.0 / (cin * kh * kw)), (cout, cin, kh, kw))
        y = b.node("Conv", [y, b.const("w", w), b.const("b", b.rng.normal(0, 0.1, cout))], "conv",
                   kernel_shape=[kh, kw], strides=[stride, stride], pads=[kh // 2, kw // 2, kh // 2, kw // 2])
        y = b.node("Max", [b.act(y, "LeakyRelu"), b.const("floor", -0.5)], "clamp")
        cin = cout
    return b.model("audio_cnn", "input", b.head(y, cin, classes), input_size, classes,
                   input_shape=[1, input_size, 40, 1])


def waveform(input_size: int = 16000, classes: int = 35, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """M5 (Dai et al. 2017, the raw-waveform classifier of torchaudio's speech-command tutorial): 1-D
    convs over audio samples ([1, 1, ``input_size``]), the first 80 taps at stride 4, each with
    BatchNormalization, ReLU and a 4x max-pool, then global average pooling and a classifier."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    y, cin = "input", 1
    for c, k, stride in ((128, 80, 4), (128, 3, 1), (256, 3, 1), (512, 3, 1)):
        cout = ch(c)
        w = b.rng.normal(0, np.sqrt(2.0 / (cin * k)), (cout, cin, k))
        y = b.node("Conv", [y, b.const("w", w)], "conv", kernel_shape=[k], strides=[stride], pads=[k // 2 - 1 + k % 2] * 2)
        bn = [b.rng.uniform(0.5, 1.5, cout), b.rng.normal(0, 0.1, cout), b.rng.normal(0, 0.1, cout),
              b.rng.uniform(0.5, 1.5, cout)]
        y = b.node("Relu", [b.node("BatchNormalization", [y] + [b.const("bn", p) for p in bn], "bn")], "relu")
        y = b.node("MaxPool", [y], "pool", kernel_shape=[4], strides=[4])
        cin = cout
    return b.model("waveform", "input", b.head(y, cin, classes), input_size, classes,
                   input_shape=[1, 1, input_size])


def superres(input_size: int = 224, classes: int = 1, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """A sub-pixel super-resolution net (ESPCN, Shi et al. 2016; the layers of PyTorch's ONNX export
    tutorial): 5x5 and 3x3 convs at the input's full resolution, a last conv to ``classes`` colour
    channels x 3 x 3 sub-pixels, and the pixel shuffle as PyTorch exports it (Reshape -> Transpose
    -> Reshape) to an image 3x the size."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    y, cin, scale = "input", classes, 3
    for c, k in ((64, 5), (64, 3), (32, 3)):
        y = b.node("Relu", [b.conv(y, cin, ch(c), k, bias=True)], "relu")
        cin = ch(c)
    y = b.conv(y, cin, classes * scale * scale, 3, bias=True)
    size = input_size
    y = b.node("Reshape", [y, b.const_int("shape", [1, classes, scale, scale, size, size])], "shuffle")
    y = b.node("Transpose", [y], "shuffle_t", perm=[0, 1, 4, 2, 5, 3])
    y = b.node("Reshape", [y, b.const_int("shape", [1, classes, size * scale, size * scale])], "shuffle_r")
    return b.model("superres", "input", y, input_size, classes, input_shape=[1, classes, size, size],
                   output_shape=[1, classes, size * scale, size * scale])


def ocr(input_size: int = 320, classes: int = 97, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """A CRNN text-line recognizer (Shi et al. 2015; the structure of EasyOCR's and PaddleOCR's
    recognizers): a conv stack over a 32-pixel-high line that pools the height to 1 and the width
    by 4, the columns as a time-major sequence, two bidirectional LSTMs as PyTorch exports them
    (``Y`` [T, 2, 1, H] -> Transpose -> Reshape to [T, 1, 2H]), per-step logits over ``classes``
    characters (CTC's blank included). Output [T, 1, classes] with T = input_size / 4."""
    b = _Builder(seed)
    ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
    y, cin = "input", 3
    for c, pool in ((32, (2, 2)), (64, (2, 2)), (128, (2, 1)), (128, (2, 1)), (256, (2, 1))):
        y = b.conv_bn(y, cin, ch(c), 3)
        y = b.node("MaxPool", [y], "pool", kernel_shape=list(pool), strides=list(pool))
        cin = ch(c)
    steps, hidden = input_size // 4, ch(96)
    y = b.node("Squeeze", [y, b.const_int("axes", [2])], "squeeze")  # [1, C, T]
    y = b.node("Transpose", [y], "to_time", perm=[2, 0, 1])  # [T, 1, C]
    for _ in range(2):
        bound = 1 / np.sqrt(hidden)
        weights = [b.const(name, b.rng.uniform(-bound, bound, shape)) for name, shape in
                   (("lstm_w", (2, 4 * hidden, cin)), ("lstm_r", (2, 4 * hidden, hidden)), ("lstm_b", (2, 8 * hidden)))]
        y = b.node("LSTM", [y, *weights], "lstm", hidden_size=hidden, direction="bidirectional")
        y = b.node("Transpose", [y], "lstm_t", perm=[0, 2, 1, 3])  # [T, 1, 2, H]
        y = b.node("Reshape", [y, b.const_int("shape", [steps, 1, 2 * hidden])], "lstm_r")
        cin = 2 * hidden
    w = b.rng.normal(0, np.sqrt(1.0 / cin), (cin, classes))
    y = b.node("Add", [b.node("MatMul", [y, b.const("fc_w", w)], "fc"), b.const("fc_b", b.rng.normal(0, 0.01, classes))],
               "logits")
    return b.model("ocr", "input", y, input_size, classes, input_shape=[1, 3, 32, input_size],
                   output_shape=[steps, 1, classes])


def vit(input_size: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """A ViT-Tiny / DeiT-Tiny image classifier (Dosovitskiy et al. 2021) as timm's models export:
    16x16 patches embedded by a strided conv, a class token and position embeddings, 12 pre-norm
    encoder blocks of 3-head self-attention (one QKV projection reshaped to [N, 3, heads, 64] and
    permuted, the three taken by Gather; scores scaled after Q K^T; softmax; heads joined) and a
    GELU MLP (its exact form: x * 0.5 * (1 + erf(x / sqrt 2))), a final LayerNorm, the class
    token's logits. Width 192 (``width`` scales the heads: 3 at 1.0)."""
    b = _Builder(seed)
    heads, head_dim, depth, patch = max(1, round(3 * width)), 64, 12, 16
    dim, tokens = heads * head_dim, (input_size // patch) ** 2 + 1

    def linear(x, cin, cout):
        w = b.rng.normal(0, np.sqrt(1.0 / cin), (cin, cout))
        return b.node("Add", [b.node("MatMul", [x, b.const("w", w)], "matmul"), b.const("b", b.rng.normal(0, 0.02, cout))],
                      "linear")

    def layer_norm(x):
        return b.node("LayerNormalization", [x, b.const("ln_g", b.rng.uniform(0.8, 1.2, dim)),
                                             b.const("ln_b", b.rng.normal(0, 0.02, dim))], "ln", axis=-1, epsilon=1e-6)

    y = b.node("Conv", ["input", b.const("w", b.rng.normal(0, np.sqrt(1.0 / (3 * patch * patch)), (dim, 3, patch, patch))),
                        b.const("b", b.rng.normal(0, 0.02, dim))], "patch", kernel_shape=[patch, patch],
               strides=[patch, patch])
    y = b.node("Transpose", [b.node("Reshape", [y, b.const_int("shape", [1, dim, tokens - 1])], "flat")], "tokens",
               perm=[0, 2, 1])
    y = b.node("Concat", [b.const("cls", b.rng.normal(0, 0.02, (1, 1, dim))), y], "cat", axis=1)
    y = b.node("Add", [y, b.const("pos", b.rng.normal(0, 0.02, (1, tokens, dim)))], "pos")
    for _ in range(depth):
        qkv = b.node("Reshape", [linear(layer_norm(y), dim, 3 * dim), b.const_int("shape", [1, tokens, 3, heads, head_dim])],
                     "qkv")
        qkv = b.node("Transpose", [qkv], "qkv_t", perm=[2, 0, 3, 1, 4])  # [3, 1, heads, N, 64]
        q, k, v = (b.node("Gather", [qkv, b.const_int("i", i)], "take", axis=0) for i in range(3))
        scores = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [k], "k_t", perm=[0, 1, 3, 2])], "qk"),
                                b.const("scale", np.float32(head_dim ** -0.5))], "scaled")
        attended = b.node("MatMul", [b.node("Softmax", [scores], "softmax", axis=-1), v], "av")
        attended = b.node("Reshape", [b.node("Transpose", [attended], "heads_t", perm=[0, 2, 1, 3]),
                                      b.const_int("shape", [1, tokens, dim])], "joined")
        y = b.node("Add", [y, linear(attended, dim, dim)], "residual")
        hidden = linear(layer_norm(y), dim, 4 * dim)
        erf = b.node("Erf", [b.node("Div", [hidden, b.const("sqrt2", np.float32(np.sqrt(2.0)))], "gelu_div")], "erf")
        gelu = b.node("Mul", [b.node("Mul", [hidden, b.node("Add", [erf, b.const("one", np.float32(1.0))], "gelu_add")],
                                     "gelu_mul"), b.const("half", np.float32(0.5))], "gelu")
        y = b.node("Add", [y, linear(gelu, 4 * dim, dim)], "residual")
    y = b.node("Gather", [layer_norm(y), b.const_int("i", 0)], "cls_token", axis=1)  # [1, dim]
    return b.model("vit", "input", linear(y, dim, classes), input_size, classes)


EXAMPLES = {"resnet18": resnet18, "mobilenetv2": mobilenetv2, "mobilenetv3": mobilenetv3,
            "shufflenet": shufflenet, "yolo": yolo, "unet": unet, "audio": audio_cnn, "waveform": waveform,
            "superres": superres, "ocr": ocr, "vit": vit}
