"""A camera's drop folder as an input of :class:`serving.line.service.LineService`.

A file is taken only when it is complete: names starting with ``.`` or ending in ``.tmp``/``.part``/``.partial`` are
never taken (a camera that writes under such a name and renames is picked up at the rename), and any other image
must keep the same size and modification time for ``settle_s`` seconds. It is then **claimed** by an atomic rename
into the store's ``incoming/`` folder, so two watchers, or a camera still holding the name, cannot both act on it.
An optional sidecar ``<stem>.json`` (written *before* the image) gives ``unit_id``, ``template_id``, ``line_id`` and
``position``; without one the unit id is the file's stem. An image that cannot be inspected goes to ``rejected/``
with a ``.reason.txt``; nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from defectops.serving.line.inspector import InspectionError
from defectops.serving.line.service import IMAGE_SUFFIXES, LineService

log = logging.getLogger("defectops.line.watch")
PARTIAL = (".tmp", ".part", ".partial", ".crdownload")


def ready_files(folder: Path, seen: dict[Path, tuple[int, int, float]], now: float, settle_s: float) -> list[Path]:
    """Images of ``folder`` whose size and mtime have not changed for ``settle_s`` (``seen`` carries the last
    observation of each: (size, mtime_ns, since)); updates ``seen``."""
    out = []
    present = set()
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() in PARTIAL or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        present.add(p)
        key = (st.st_size, st.st_mtime_ns)
        prev = seen.get(p)
        if prev is None or prev[:2] != key:
            seen[p] = (*key, now)
        elif st.st_size > 0 and now - prev[2] >= settle_s:
            out.append(p)
    for p in list(seen):
        if p not in present:
            del seen[p]
    return out


class FolderWatcher:
    def __init__(self, service: LineService, folder: Path, *, poll_s: float = 0.2, settle_s: float = 0.5) -> None:
        self.service, self.folder, self.poll_s, self.settle_s = service, Path(folder), poll_s, settle_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processed = 0
        self.rejected = 0

    def _claim(self, p: Path) -> tuple[Path, dict[str, Any]]:
        incoming = self.service.store.root / "incoming"
        claimed = incoming / f"{uuid.uuid4().hex}-{p.name}"
        os.rename(p, claimed)  # atomic: from here on the file is ours alone
        meta: dict[str, Any] = {}
        side = p.with_suffix(".json")
        if side.is_file():
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                meta = {"_error": f"sidecar {side.name} is not JSON ({e})"}
            os.replace(side, claimed.with_suffix(".json"))
        return claimed, meta

    def _reject(self, claimed: Path, reason: str) -> None:
        dest = self.service.store.root / "rejected" / claimed.name
        os.replace(claimed, dest)
        (dest.parent / f"{dest.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
        self.rejected += 1
        log.error("rejected %s: %s", claimed.name, reason)

    def process(self, p: Path) -> None:
        try:
            claimed, meta = self._claim(p)
        except FileNotFoundError:
            return  # taken by someone else between the scan and the rename
        if "_error" in meta:
            self._reject(claimed, meta["_error"])
            return
        try:
            tpl = self.service.template_path(str(meta["template_id"])) if meta.get("template_id") else None
            self.service.inspect(claimed, unit_id=str(meta.get("unit_id") or p.stem), template=tpl,
                                 line_id=meta.get("line_id"), position=meta.get("position"), move=True)
            claimed.with_suffix(".json").unlink(missing_ok=True)
            self.processed += 1
        except InspectionError as e:
            self._reject(claimed, str(e))

    def scan_once(self, seen: dict[Path, tuple[int, int, float]], now: float) -> int:
        files = ready_files(self.folder, seen, now, self.settle_s)
        for p in files:
            if self.service.holder.current() is None:
                return 0  # no model yet: leave the files where they are
            self.process(p)
            seen.pop(p, None)
        return len(files)

    def start(self) -> None:
        import time

        self.folder.mkdir(parents=True, exist_ok=True)

        def loop() -> None:
            seen: dict[Path, tuple[int, int, float]] = {}
            while not self._stop.wait(self.poll_s):
                try:
                    self.scan_once(seen, time.monotonic())
                except Exception as e:  # the watcher must outlive one bad scan; log.exception records it
                    log.exception("watch %s: %s", self.folder, e)

        self._thread = threading.Thread(target=loop, name="defectops-line-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
