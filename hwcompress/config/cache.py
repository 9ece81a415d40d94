"""Where hwc keeps what it makes once and reuses: tuning records, measurements, the aarch64 runtime,
the CUDA driver stand-in. ``HWC_CACHE_DIR`` overrides; otherwise the XDG cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("HWC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hwcompress")
    return Path(base)
