"""How far a compressed model's outputs are from the original's, on held-out calibration data."""

from __future__ import annotations

import numpy as np
import onnx

from ..data.calibration import Calibration
from ..model import reference as ort


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    """Relative RMS output error (||y - y'|| / ||y||) over all the feeds."""
    a, b = ort.session(reference), ort.session(candidate)
    ref, got = [], []
    for f in feeds:
        ref += a.run(None, f)
        got += b.run(None, f)
    return ort.rms_error(ref, got)


def split_feeds(calibration: Calibration) -> tuple[list, list, str]:
    """Fit on three quarters, evaluate on the rest (on everything when there are fewer than 8)."""
    feeds = calibration.feeds
    if len(feeds) < 8:
        return feeds, feeds, "the calibration data itself (fewer than 8 samples to hold out)"
    cut = len(feeds) * 3 // 4
    return feeds[:cut], feeds[cut:], f"{len(feeds) - cut} held-out calibration samples"
