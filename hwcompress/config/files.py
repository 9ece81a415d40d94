"""YAML definitions (targets, profiles) found on a search path and checked against a schema.

The search path is, first to last: directories given on the command line (``--targets-dir``,
``--profiles-dir``), then those in ``HWC_TARGETS_PATH`` / ``HWC_PROFILES_PATH`` (``os.pathsep``
separated), then the built-in files shipped in the package. The first file that defines a name wins,
so a user can add or override a target or profile by dropping a YAML file in a directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

from ..errors import HwcError


@dataclass(frozen=True)
class Kind:
    """One kind of definition: its folder of built-ins, its environment variable, its schema and key."""

    name: str
    folder: str
    env_var: str
    schema: dict[str, Any]
    key: Callable[[dict[str, Any]], Any]


def search_dirs(kind: Kind, extra: list[str | os.PathLike] | None = None) -> list[Path]:
    dirs = [Path(d) for d in extra or []]
    dirs += [Path(d) for d in os.environ.get(kind.env_var, "").split(os.pathsep) if d]
    for d in dirs:
        if not d.is_dir():
            raise HwcError(f"{kind.name} directory {d} does not exist")
    return dirs + [_builtin_dir(kind.folder)]


def load_definitions(kind: Kind, extra: list[str | os.PathLike] | None = None) -> dict[Any, tuple[Path, dict]]:
    """All definitions of ``kind`` on the search path, by ``kind.key``; the first file wins."""
    found: dict[Any, tuple[Path, dict]] = {}
    for directory in search_dirs(kind, extra):
        for path in sorted(Path(directory).glob("*.yaml")) + sorted(Path(directory).glob("*.yml")):
            data = load_yaml(path, kind.schema, kind.name)
            found.setdefault(kind.key(data), (path, data))
    return found


def load_yaml(path: Path, schema: dict[str, Any], kind: str) -> dict[str, Any]:
    """Parse and validate one file; any problem is one line naming the file and the field."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise HwcError(f"{path}:{line} not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    except OSError as exc:
        raise HwcError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise HwcError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from exc
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        field_path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise HwcError(f"{path}: invalid {kind} file: {field_path}: {error.message}")
    return data


def _builtin_dir(folder: str) -> Path:
    """Built-in YAMLs: inside an installed wheel, or beside the package in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    installed = package / folder
    return installed if installed.is_dir() else package.parent / folder
