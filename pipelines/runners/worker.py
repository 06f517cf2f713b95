"""One process of a distributed step: ``python -m defectops.pipelines.runners.worker <step> --run-root R --home H``.

The train step starts it under torchrun when ``train.nproc`` > 1 (:mod:`pipelines.steps.train`); each process runs the
step against the run root with its pinned ``config.yaml`` through the local runner, and rank 0 reports progress, epoch
lines and errors on stdout in the protocol of :mod:`training.launch` for the launching process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from defectops.core.layout import RUN
from defectops.pipelines.context import Reporter
from defectops.pipelines.runners.local import RunError, run_single
from defectops.training.distributed import env_info
from defectops.training.launch import WORKER_PREFIX


class _WorkerReporter(Reporter):
    """Rank 0's reporter in a worker started by the train step: progress and log lines for the launching process."""

    def __init__(self, flush_s: float = 0.5) -> None:
        self.pending = 0
        self.last = time.monotonic()
        self.flush_s = flush_s

    def _emit(self, obj: dict[str, Any]) -> None:
        print(WORKER_PREFIX + json.dumps(obj), flush=True)

    def flush(self) -> None:
        if self.pending:
            self._emit({"advance": self.pending})
            self.pending = 0
        self.last = time.monotonic()

    def task(self, description: str, total: int | None) -> Any:
        def advance(n: int) -> None:
            self.pending += n
            if time.monotonic() - self.last >= self.flush_s:
                self.flush()
        return advance

    def log(self, message: str) -> None:
        self.flush()
        self._emit({"log": message})

    def error(self, message: str) -> None:
        self.flush()
        self._emit({"error": message})


def worker_main(argv: list[str] | None = None) -> int:
    """One process of a distributed step (started by the train step under torchrun): run ``step`` against the run
    root with its pinned config.yaml. Rank 0 reports progress, epochs and errors on stdout for the launcher."""
    import argparse
    import traceback

    from defectops.pipelines.config import from_yaml

    p = argparse.ArgumentParser(prog="python -m defectops.pipelines.runners.worker", description=worker_main.__doc__)
    p.add_argument("step")
    p.add_argument("--run-root", type=Path, required=True)
    p.add_argument("--home", type=Path, required=True)
    args = p.parse_args(argv)
    out = _WorkerReporter() if env_info().is_main else None
    try:
        cfg = from_yaml((args.run_root / RUN.config).read_text(encoding="utf-8"))
        run_single(args.step, cfg, args.run_root, home=args.home, reporter=out or Reporter(), force=True)
    except RunError as e:
        if out:
            out.error(str(e.__cause__ or e))
        return 3 if e.gate_failure else 1
    except Exception as e:  # noqa: BLE001 - any crash of a worker process is reported to the launcher
        traceback.print_exc()
        if out:
            out.error(f"{type(e).__name__}: {e}")
        return 1
    if out:
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
