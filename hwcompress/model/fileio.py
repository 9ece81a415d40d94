"""Atomic output: a reader never sees a half-written file or directory, and nothing hwc did not
write is ever deleted.

Outputs are written to a temporary sibling (``.NAME.PID.xxxx.tmp``) that replaces the output only on
success; siblings left by a process that was killed are removed by the next run. An output directory
is replaced as a whole, so it is refused while it holds the input or files hwc did not write (hwc
lists what it wrote in ``.hwc-output.json``), unless the user forces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import onnx

from ..errors import HwcError

MARKER = ".hwc-output.json"


def check_output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """Refuse, before any work, an output directory hwc must not replace or cannot write."""
    final = Path(path).resolve()
    shown = str(path)
    if final.exists() and not final.is_dir():
        raise HwcError(f"-o {shown}: is a file, not a directory")
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise HwcError(f"-o {shown}: is the current directory (or holds it); hwc replaces its output directory "
                       f"as a whole: name a new directory")
    for item in inputs:
        source = Path(item).resolve()
        if source == final or final in source.parents:
            raise HwcError(f"-o {shown}: holds the input {item}; hwc replaces its output directory as a whole, "
                           f"so it must not hold the input: name a new directory")
    if final.is_dir() and not force:
        foreign = sorted(set(_entries(final)) - written_by_hwc(final))
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise HwcError(f"-o {shown}: holds files hwc did not write ({', '.join(foreign[:3])}{more}); hwc "
                           f"replaces its output directory as a whole: name a new or empty directory, or give "
                           f"--force to replace it")
    check_writable(final.parent, shown)


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    final = Path(path).resolve()
    if final.is_dir():
        raise HwcError(f"-o {path}: is a directory; name the file to write")
    if any(Path(item).resolve() == final for item in inputs):
        raise HwcError(f"-o {path}: is the input; write the result to another file")
    check_writable(final.parent, str(path))


def check_writable(directory: Path, shown: str) -> None:
    """The directory exists or can be created, and a file can be made in it."""
    existing = Path(directory)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise HwcError(f"-o {shown}: cannot be created: {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hwc-write-test.", dir=existing))
    except OSError as exc:
        raise HwcError(f"-o {shown}: cannot write in {existing}: {exc.strerror}") from exc


def written_by_hwc(directory: Path) -> set[str]:
    """The entries a previous hwc run wrote in ``directory`` (from its marker)."""
    try:
        return set(json.loads((directory / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _entries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()]


def _temporary_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}."


def clean_stale_temporaries(final: Path) -> None:
    """Remove temporary siblings of ``final`` left by hwc processes that no longer run (a SIGKILL)."""
    if not final.parent.is_dir():
        return
    for stale in final.parent.glob(f".{glob_escape(final.name)}.*.tmp"):
        pid = stale.name[len(final.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(final), suffix=".tmp", dir=final.parent)
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
    clean_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"files": sorted(_entries(tmp))}) + "\n")
        if final.exists():
            # The old output moves aside under a temporary name (cleaned like any other), then goes.
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), suffix=".tmp", dir=final.parent))
            os.replace(final, old / "old")
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
