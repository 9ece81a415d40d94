"""Graph passes: each a pure ONNX -> ONNX function (see ``base.model_pass``).

``CANONICAL`` is the clean-up every model gets before compression or compilation.
"""

from __future__ import annotations

import onnx

from .base import ModelPass, PassLog, PassResult, model_pass
from .canonicalize_reshape import canonicalize_reshape
from .channel_multiplier import channel_multiplier_as_depthwise
from .conv1d_as_conv2d import conv1d_as_conv2d
from .einsum_as_matmul import einsum_as_matmul
from .convtranspose_as_conv import convtranspose_as_conv
from .eliminate_identity import eliminate_identity
from .explicit_pads import explicit_pads
from .fold_batchnorm import fold_batchnorm
from .gather_as_slice import gather_as_slice
from .prune_channels import prune_channels
from .space_to_depth_as_conv import space_to_depth_as_conv
from .unroll_recurrent import unroll_recurrent

CANONICAL: tuple[ModelPass, ...] = (eliminate_identity, gather_as_slice, einsum_as_matmul, fold_batchnorm,
                                    canonicalize_reshape,
                                    conv1d_as_conv2d,
                                    explicit_pads, convtranspose_as_conv, channel_multiplier_as_depthwise,
                                    space_to_depth_as_conv)


def run_canonical(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassLog]]:
    """Apply the canonical passes in order; return the model and each pass's log."""
    logs = []
    for p in CANONICAL:
        result = p.apply(model)
        model = result.model
        logs.append(result.log)
    return model, logs


__all__ = ["CANONICAL", "ModelPass", "PassLog", "PassResult", "canonicalize_reshape", "channel_multiplier_as_depthwise",
           "conv1d_as_conv2d",
           "convtranspose_as_conv", "einsum_as_matmul",
           "eliminate_identity", "explicit_pads", "fold_batchnorm", "gather_as_slice", "model_pass", "prune_channels", "run_canonical",
           "space_to_depth_as_conv", "unroll_recurrent"]
