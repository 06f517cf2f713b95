"""Supervise a ``torchrun`` launch from the process that started it: forward rank 0's progress, keep its error.

Why: a distributed train step runs in worker processes the launching step cannot see into. Rank 0 prints one JSON
line per event prefixed with :data:`WORKER_PREFIX` (``{"log": ...}``, ``{"advance": n}``, ``{"error": ...}``);
everything else is kept as the output's tail for the error message. The workers end with this process: torchrun stops
them on SIGTERM, and a launcher interrupted here terminates torchrun (then kills it after 30 s).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WORKER_PREFIX = "defectops-worker:"
"""Lines a distributed step's rank 0 prints for the launching process: ``<prefix>{"log"|"advance"|"error": ...}``."""


@dataclass(frozen=True)
class LaunchResult:
    """How the launch ended: torchrun's exit code, rank 0's reported error (if any) and the output's last lines."""

    code: int
    error: str | None
    tail: tuple[str, ...]

    def detail(self) -> str:
        """The most useful one-line reason for a failed launch."""
        return self.error or " | ".join(x for x in self.tail[-8:] if x.strip()) or f"exit code {self.code}"


def torchrun_command(python: str, nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=<nproc> -m <module> <args...>``."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
            *args]


def worker_env(nproc: int) -> dict[str, str]:
    """The launch environment: unbuffered output, and the CPU threads split between the processes unless set."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def supervise(cmd: Sequence[str], env: dict[str, str], *, advance: Callable[[int], None],
              log: Callable[[str], None]) -> LaunchResult:
    """Run ``cmd``, forwarding rank 0's ``advance`` and ``log`` events; returns when it exits."""
    tail: deque[str] = deque(maxlen=40)
    error = None
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line[len(WORKER_PREFIX):]) if line.startswith(WORKER_PREFIX) else None
            except json.JSONDecodeError:  # a line garbled by another process's output
                msg = None
            if not isinstance(msg, dict):
                tail.append(line.rstrip())
                continue
            if "advance" in msg:
                advance(int(msg["advance"]))
            elif "log" in msg:
                log(msg["log"])
            elif "error" in msg:
                error = msg["error"]
        code = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return LaunchResult(code, error, tuple(tail))
