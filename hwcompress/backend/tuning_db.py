"""The tuning database's hygiene: MetaSchedule appends JSON lines, so a power cut can leave a torn
last line and a failed candidate becomes a record; both would poison every later compile. Here a
torn or foreign line is dropped with one warning naming the file, failed measurements are dropped
silently, and which kernels finished tuning is recorded beside the database (``hwc-tuned.json``), so
that a kernel whose tuning was interrupted is tuned again by the next run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ..model.fileio import write_text

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
DONE = "hwc-tuned.json"
FAILED_SECONDS = 1e9  # MetaSchedule stores a failed build or run as a huge time


def repair(db_dir: Path, warn: Callable[[str], None]) -> None:
    """Rewrite the database without torn, foreign or failed lines (atomically), if it has any."""
    workload_path, record_path = Path(db_dir) / WORKLOADS, Path(db_dir) / RECORDS
    if not workload_path.exists() and not record_path.exists():
        return
    workloads = _lines(workload_path)
    index, kept_workloads, torn_workloads = {}, [], 0
    for old, line in enumerate(workloads):
        value = _json(line)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            index[old] = len(kept_workloads)
            kept_workloads.append(line)
        else:
            torn_workloads += 1
    kept_records, torn_records, failed = [], 0, 0
    for line in _lines(record_path):
        value = _json(line)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
                and isinstance(value[1], list) and len(value[1]) >= 2 and value[0] in index):
            torn_records += 1
            continue
        seconds = value[1][1]
        if not isinstance(seconds, list) or not seconds or not all(
                isinstance(s, (int, float)) and math.isfinite(s) and 0 <= s < FAILED_SECONDS for s in seconds):
            failed += 1
            continue
        value[0] = index[value[0]]
        kept_records.append(json.dumps(value, separators=(",", ":")))
    if torn_workloads:
        warn(f"{workload_path}: skipped {torn_workloads} torn or foreign line(s)")
    if torn_records:
        warn(f"{record_path}: skipped {torn_records} torn or foreign line(s)")
    if torn_workloads or torn_records or failed:
        write_text(workload_path, "".join(line + "\n" for line in kept_workloads))
        write_text(record_path, "".join(line + "\n" for line in kept_records))


def records(db_dir: Path):
    """The database in ``db_dir`` for reading, parsed once per process while its files stay as they
    are: MetaSchedule's JSON database parses every record's trace on opening (1.1 s for 581
    records), and a search builds dozens of candidates against the same records. A file that
    changed (tuning appended, ``repair`` rewrote) is read again. Tuning writes through a handle of
    its own (``open_database``), never this one."""
    paths = (Path(db_dir) / WORKLOADS, Path(db_dir) / RECORDS)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in paths)
    cached = _READERS.get(str(db_dir))
    if cached is None or cached[0] != stamp:
        cached = (stamp, open_database(db_dir))
        _READERS[str(db_dir)] = cached
    return cached[1]


def open_database(db_dir: Path):
    """MetaSchedule's JSON database in ``db_dir`` (its files made where missing)."""
    import tvm.s_tir.meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(Path(db_dir) / WORKLOADS),
                                    path_tuning_record=str(Path(db_dir) / RECORDS))


_READERS: dict[str, tuple] = {}  # folder -> (its files' size and time, the parsed database)


def tuned_tasks(db_dir: Path) -> set[str]:
    """Kernels whose tuning ran to its end (their records are complete)."""
    value = _json((Path(db_dir) / DONE).read_text()) if (Path(db_dir) / DONE).exists() else None
    return set(value) if isinstance(value, list) else set()


def mark_tuned(db_dir: Path, keys: set[str]) -> None:
    write_text(Path(db_dir) / DONE, json.dumps(sorted(tuned_tasks(db_dir) | keys), indent=0) + "\n")


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_bytes().decode("utf-8", "replace").splitlines() if line.strip()]


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
