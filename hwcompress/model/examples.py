"""Example models written by the project's own code: real structure, random weights.

They let a newcomer run hwc without downloading anything, and give tests and benchmarks standard
architectures (ResNet-18, MobileNetV2) with BatchNormalization still in place. Weights are He-scaled
and BN statistics are non-trivial, so activations stay in a realistic range and folding is exercised.
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
        if act == "Relu":
            y = self.node("Relu", [y], "relu")
        elif act == "Relu6":
            y = self.node("Clip", [y, self.const("lo", 0.0), self.const("hi", 6.0)], "relu6")
        return y

    def head(self, x: str, features: int, classes: int) -> str:
        y = self.node("GlobalAveragePool", [x], "gap")
        y = self.node("Flatten", [y], "flatten", axis=1)
        w = self.rng.normal(0, np.sqrt(1.0 / features), (classes, features))
        return self.node("Gemm", [y, self.const("fc_w", w), self.const("fc_b", self.rng.normal(0, 0.01, classes))],
                         "fc", transB=1)

    def model(self, name: str, x: str, y: str, input_size: int, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, input_size, input_size])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, classes])], self.initializers)
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


EXAMPLES = {"resnet18": resnet18, "mobilenetv2": mobilenetv2}
