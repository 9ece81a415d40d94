"""hwcompress: hardware-aware compression and compilation of ONNX models with Apache TVM."""

__version__ = "0.1.0"
