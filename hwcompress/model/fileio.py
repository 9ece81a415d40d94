"""Atomic output: a reader never sees a half-written file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is an ordinary file
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# Beyond this many bytes a model is saved with its weights in an external data file.
_PROTOBUF_LIMIT = 1_800_000_000


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save atomically; large models keep their weights in ``<name>.data`` beside the file."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        with atomic_path(final) as tmp:
            onnx.save_model(model, str(tmp))
        return
    # Weights first, then the model that points at them: the model file appears last.
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp_dir:
        data_name = final.name + ".data"
        onnx.save_model(model, os.path.join(tmp_dir, final.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name)
        os.replace(os.path.join(tmp_dir, data_name), final.with_name(data_name))
        os.replace(os.path.join(tmp_dir, final.name), final)
