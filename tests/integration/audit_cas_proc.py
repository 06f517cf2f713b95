"""One "host" of tests/integration/test_audit_cas.py: appends to (or approves on) a registry whose artifacts are on S3.

Usage: ``python audit_cas_proc.py append|approve|approve-local|approve-hosts TRACKING_URI MODEL LOCK_DIR BARRIER NAME``
(``approve-local``/``-hosts``: a local artifact store, where the race is held at the commit instead; ``-hosts``:
each process with its own lock files, as on separate hosts). Each
process has its own lock dir (nothing shared but the registry and the S3 store). Its first conditional put waits
until both processes have reached theirs (a file barrier), so both have read the same trail head and race for the
same key.
Prints one JSON line: ``{"seq": n}`` or ``{"error": "...", "type": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    mode, uri, model, lock_dir, barrier, name = sys.argv[1:7]
    if mode != "approve-local":  # two "hosts": each its own decision lock files, only the registry and store shared
        os.environ["DEFECTOPS_AUDIT_LOCK_DIR"] = lock_dir
    from defectops.registry import audit_store
    from defectops.registry.config import RegistryConfig
    from defectops.registry.governance import approve
    from defectops.registry.mlflow_registry import client as make_client

    put = audit_store.S3Records.put
    waited: list[bool] = []

    def put_at_barrier(self: audit_store.S3Records, record: dict[str, Any]) -> bool:
        if not waited:
            waited.append(True)
            (Path(barrier) / name).touch()
            deadline = time.monotonic() + 60
            while len(list(Path(barrier).iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        return put(self, record)

    audit_store.S3Records.put = put_at_barrier  # type: ignore[method-assign]
    publish = audit_store.RegistryTrail._publish

    def publish_at_barrier(self: audit_store.RegistryTrail, *args: Any, **kwargs: Any) -> Any:
        """Without compare-and-set (a local artifact store): wait (at most 5 s) for the other host before the
        commit, so that without a shared lock both would commit after the same head."""
        (Path(barrier) / name).touch()
        deadline = time.monotonic() + 5
        while len(list(Path(barrier).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return publish(self, *args, **kwargs)

    if mode in ("approve-local", "approve-hosts"):
        audit_store.RegistryTrail._publish = publish_at_barrier  # type: ignore[method-assign]
    c = make_client(uri)
    try:
        if mode == "append":
            rec = audit_store.RegistryTrail(c, model, Path(lock_dir)).append(
                actor=name, role="admin", action="reject", version="1", previous_champion=None, reason=name,
                evidence="0" * 64)
        else:
            rec = approve(c, model, "1", actor=name, role="quality-lead", reason=name, cfg=RegistryConfig(),
                          max_regression=0.02, lock_dir=Path(lock_dir))
        print(json.dumps({"seq": rec.seq}))
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": str(e), "type": type(e).__name__}))


if __name__ == "__main__":
    main()
