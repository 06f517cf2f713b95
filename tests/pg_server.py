"""A real PostgreSQL server for tests (Debian's binaries: initdb, pg_ctl), on a free loopback port, trust auth.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (``su``), otherwise as the
current user. Stopped with ``pg_ctl -m immediate`` at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mqtt_broker import free_port


def _run(cmd: str) -> None:
    if os.geteuid() == 0:
        subprocess.run(["su", "postgres", "-s", "/bin/bash", "-c", cmd], check=True, capture_output=True)
    else:
        subprocess.run(["bash", "-c", cmd], check=True, capture_output=True)


@contextmanager
def postgres() -> Iterator[str]:
    """Yield ``host=127.0.0.1 port=P user=postgres`` for a fresh cluster in its own temporary folder (outside
    pytest's private tmp tree, which the ``postgres`` user cannot enter)."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl are not on PATH: install Debian's postgresql package")
    work = Path(tempfile.mkdtemp(prefix="defectops-pg-"))
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
    port = free_port()
    data = work / "data"
    _run(f"initdb -D {data} -A trust -U postgres > {work}/initdb.log 2>&1")
    _run(f"pg_ctl -D {data} -o '-p {port} -k {work} -c listen_addresses=127.0.0.1' -l {work}/server.log -w start")
    try:
        yield f"host=127.0.0.1 port={port} user=postgres"
    finally:
        _run(f"pg_ctl -D {data} -m immediate stop")
        shutil.rmtree(work, ignore_errors=True)
