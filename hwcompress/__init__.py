"""hwcompress: hardware-aware compression and compilation of ONNX models with Apache TVM."""

from .config.host import use_all_cores

__version__ = "0.1.0"

use_all_cores()  # before TVM's thread pool starts in this process or in its workers
