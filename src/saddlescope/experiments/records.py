"""A resumable record store: one JSON file per finished run, written atomically.

Layout of a study folder::

    study.json            what every run depends on (checked on resume)
    runs/run-000042.json  one finished run each

A record is written to a temporary file in ``runs/`` (a name starting with ``.`` and ending in
``.tmp``), flushed and fsync'ed, then renamed over its final name with :func:`os.replace`, and the
folder is fsync'ed: a reader sees the whole record or none, and a run id maps to one file name, so
a record can never be half written or duplicated. Killing the writer at any moment loses at most
the runs still being computed; their leftover temporary files are never read as records and are
removed by :meth:`RecordStore.clean_temporary`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saddlescope.atomic import atomic_write_text
from saddlescope.errors import InvalidInputError

__all__ = ["RecordStore", "atomic_write_json", "json_restore", "json_safe"]

_RECORD = re.compile(r"^run-(\d{6,})\.json$")


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings (read back by :func:`json_restore`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_restore(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_restore(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as JSON atomically (:func:`saddlescope.atomic.atomic_write_text`); non-finite
    floats become strings that :func:`json_restore` reads back."""
    return atomic_write_text(path, json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")


class RecordStore:
    """Finished runs of one study, one JSON file per run id.

    Args:
        folder: the study folder (created if missing).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InvalidInputError(f"{self.folder} exists and is not a folder; choose another --out")
        self.runs = self.folder / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.study_file = self.folder / "study.json"

    # ------------------------------------------------------------------ the study's identity
    def bind(self, key: dict[str, Any]) -> None:
        """Record what the runs depend on, or check that a resumed study has the same.

        Raises:
            InvalidInputError: the folder holds runs of a study with a different ``key``.
        """
        key = json_restore(json.loads(json.dumps(json_safe(key))))  # compare as it reads back
        if self.study_file.exists():
            stored = json_restore(json.loads(self.study_file.read_text(encoding="utf-8")))
            if stored != key:
                changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
                raise InvalidInputError(
                    f"{self.folder} holds a study with different settings ({', '.join(changed)}); "
                    "resume it with the same settings or choose another --out"
                )
            return
        if any(self._record_files()):
            raise InvalidInputError(f"{self.runs} holds records but no study.json; choose another --out")
        atomic_write_json(self.study_file, key)

    # ------------------------------------------------------------------ records
    def path(self, run_id: int) -> Path:
        return self.runs / f"run-{run_id:06d}.json"

    def write(self, run_id: int, record: dict[str, Any]) -> Path:
        """Write one finished run atomically (replacing an earlier record of the same id)."""
        if not (isinstance(run_id, int) and run_id >= 0):
            raise InvalidInputError(f"run_id must be an integer >= 0, got {run_id!r}")
        return atomic_write_json(self.path(run_id), {**record, "run_id": run_id})

    def _record_files(self) -> Iterator[tuple[int, Path]]:
        for entry in self.runs.iterdir():
            match = _RECORD.match(entry.name)
            if match and entry.is_file():
                yield int(match.group(1)), entry

    def completed(self) -> set[int]:
        """Run ids with a finished record (temporary files never count)."""
        return {run_id for run_id, _ in self._record_files()}

    def read(self, run_id: int) -> dict[str, Any]:
        return json_restore(json.loads(self.path(run_id).read_text(encoding="utf-8")))

    def load(self, run_ids: set[int] | None = None) -> list[dict[str, Any]]:
        """Finished records, by run id (all, or those in ``run_ids``)."""
        ids = sorted(self.completed() if run_ids is None else self.completed() & set(run_ids))
        return [self.read(i) for i in ids]

    def temporary_files(self) -> list[Path]:
        """Leftovers of writes that were interrupted (never read as records)."""
        return [p for p in self.runs.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]

    def clean_temporary(self) -> int:
        """Remove leftovers of interrupted writes; returns how many. Call only when no writer runs."""
        stale = self.temporary_files()
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
