"""Latency of the crop classifier in each runtime, against the time a production line leaves per board.

What: :func:`measure` times a runtime (a callable taking a float32 N x C x H x W batch) at one batch size and
:func:`summarize` (pure) turns the per-call times into p50/p99 per call and images/s; :func:`line_budget` (pure) says
how long one board may take at a line rate (boards per minute) and the margin left once its candidate crops are
classified. ``defectops bench latency`` runs them for PyTorch eager, ONNX FP32, ONNX INT8 and Triton.

Why: a model that is accurate but cannot keep up with the line is not deployable, and which runtime and batch size to
serve with is a measured decision: on CPU the ONNX and INT8 runtimes are several times faster than eager PyTorch,
and batching trades latency for throughput.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LatencyResult", "LineBudget", "line_budget", "measure", "summarize"]


@dataclass(frozen=True)
class LatencyResult:
    """Timing of one runtime at one batch size: per call (one batch) p50/p99 in ms and throughput."""

    batch: int
    calls: int
    p50_ms: float
    p99_ms: float
    images_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(call_seconds: Sequence[float], batch: int) -> LatencyResult:
    """Pure: p50/p99 of the per-call times (ms) and images/s from the median call."""
    t = np.asarray(call_seconds, dtype=np.float64)
    if t.size == 0 or batch < 1:
        raise ValueError("summarize needs at least one timed call and batch >= 1")
    p50 = float(np.percentile(t, 50))
    return LatencyResult(batch, int(t.size), 1000 * p50, 1000 * float(np.percentile(t, 99)),
                         batch / p50 if p50 > 0 else float("inf"))


def measure(run: Callable[[np.ndarray], Any], images: np.ndarray, batch: int, *, warmup: int = 3,
            min_calls: int = 20, min_seconds: float = 1.0, max_calls: int = 2000) -> LatencyResult:
    """Call ``run`` on batches of ``batch`` images cycled from ``images`` (after ``warmup`` untimed calls) until both
    ``min_calls`` and ``min_seconds`` are reached (or ``max_calls``), and summarize."""
    n = len(images)
    if n == 0:
        raise ValueError("measure needs at least one image")
    reps = -(-batch // n)
    pool = np.ascontiguousarray(np.concatenate([images] * reps) if reps > 1 else images, np.float32)

    def nth(i: int) -> np.ndarray:
        start = (i * batch) % (len(pool) - batch + 1)
        return pool[start:start + batch]

    for i in range(warmup):
        run(nth(i))
    times: list[float] = []
    t_end = time.perf_counter() + min_seconds
    i = 0
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < t_end):
        x = nth(i)
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
        i += 1
    return summarize(times, batch)


@dataclass(frozen=True)
class LineBudget:
    """Per-board time at a line rate, what classifying one board's crops takes, and the margin (negative: too slow)."""

    line_rate_bpm: float
    budget_ms: float
    crops_per_board: float
    per_board_ms: float
    margin_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def line_budget(line_rate_bpm: float, crops_per_board: float, images_per_s: float) -> LineBudget:
    """Pure: ``budget_ms = 60000 / line_rate``; a board's classification takes ``crops_per_board / images_per_s``."""
    if line_rate_bpm <= 0:
        raise ValueError(f"line rate must be > 0 boards per minute, got {line_rate_bpm}")
    budget = 60000.0 / line_rate_bpm
    per_board = 1000.0 * crops_per_board / images_per_s if images_per_s > 0 else float("inf")
    return LineBudget(line_rate_bpm, budget, crops_per_board, per_board, budget - per_board)
