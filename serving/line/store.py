"""The line service's local store: every inspected image with its result, and the repair station's verdicts.

Layout under ``--store``::

    images/<YYYY-MM-DD>/<transaction id>/tested.<ext>, template.<ext>   the board as inspected
    results.jsonl                                                        one result per line, in inspection order
    verdicts.jsonl                                                       one verdict per line, as received
    alarms.jsonl, alarm_state.json                                       systematic-defect alarms, the monitor's state
    incoming/, rejected/                                                 files claimed from a watched folder

Images are written to a temporary name and renamed; each JSONL record is one ``write`` of a whole line followed by
``fsync``, so a crash can at most leave a truncated last line, which readers skip (:func:`read_jsonl`). This is what
``defectops data import line`` turns into the next dataset snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from defectops.core.fsutil import atomic_path

VERDICTS = ("confirmed", "false_fail", "accepted")
"""A repair station's word on a reported defect: ``confirmed`` (a real defect, repaired or scrapped), ``false_fail``
(no defect: a false call), ``accepted`` (a real deviation within tolerance: the board ships as is)."""


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file; a truncated last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            if line.strip():
                yield json.loads(line)


class LineStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("images", "incoming", "rejected"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def results_path(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def verdicts_path(self) -> Path:
        return self.root / "verdicts.jsonl"

    def board_dir(self, transaction_id: str, day: str) -> Path:
        return self.root / "images" / day / transaction_id

    def keep_image(self, src: Path, dest_dir: Path, name: str, *, move: bool) -> Path:
        """Copy (or move) ``src`` into ``dest_dir`` as ``name`` + its suffix, atomically."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{name}{src.suffix.lower() or '.png'}"
        if move:
            try:
                os.replace(src, dest)
                return dest
            except OSError:  # another file system: copy, then remove
                pass
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        if move:
            src.unlink(missing_ok=True)
        return dest

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
        with self._lock, path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def append_result(self, result: dict[str, Any]) -> None:
        self._append(self.results_path, result)

    def append_verdict(self, verdict: dict[str, Any]) -> None:
        self._append(self.verdicts_path, verdict)

    def append_alarm(self, alarm: dict[str, Any]) -> None:
        self._append(self.root / "alarms.jsonl", alarm)

    def result(self, transaction_id: str) -> dict[str, Any] | None:
        for r in read_jsonl(self.results_path):
            if r.get("transaction_id") == transaction_id:
                return r
        return None
