"""One way for test fixtures to wait for a server they started: poll until it answers, fail with its log when it exits
or does not answer in time (the MLflow, review, moto, SeaweedFS and Triton fixtures all use it)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ServerDidNotStart(RuntimeError):
    """A test server exited or did not answer in time; the message ends with its log's tail."""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200 (any network error, or another status, is "not yet")."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_until_ready(what: str, ready: Callable[[], bool], *, alive: Callable[[], bool], log: Path | None,
                     timeout: float, interval: float = 0.2) -> None:
    """Call ``ready()`` every ``interval`` s until it is true; ServerDidNotStart when ``alive()`` turns false or after
    ``timeout`` s. An exception from ``ready()`` counts as not ready yet (its last one is reported)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if ready():
                return
        except Exception as e:  # noqa: BLE001 - not up yet: connection refused, 5xx while it registers...
            last = e
        exited = not alive()
        if exited or time.monotonic() > deadline:
            why = "exited" if exited else f"did not answer within {timeout:.0f} s"
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            detail = f" (last error: {last})" if last else ""
            raise ServerDidNotStart(f"{what} {why}{detail}; log {log}:\n{tail}")
        time.sleep(interval)
