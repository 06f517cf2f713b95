"""What several steps share: the task's classes, whether the run has boards, the run's MLflow run, who is acting."""

from __future__ import annotations

import getpass
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core import tags as T
from defectops.core.fsutil import read_json, write_json
from defectops.core.layout import RUN
from defectops.core.taxonomy import DEFECT_TYPES
from defectops.pipelines.config import artifact_location, tracking_uri
from defectops.pipelines.context import StepContext, StepError
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig
from defectops.training.config import DataConfig
from defectops.training.snapshot import load_snapshot


def task_classes(data: DataConfig) -> list[str]:
    """The classes of the candidate-verification task: the good class (false call) and the DeepPCB defect types."""
    return [data.good_class, *DEFECT_TYPES]


def has_boards(ctx: StepContext) -> bool:
    """Whether the run's snapshot holds board pairs (candidate verification) rather than images (classification)."""
    return any("template" in s for s in load_snapshot(ctx.path(RUN.snapshot)).samples)


def registry_client(ctx: StepContext, registry: RegistryConfig) -> tuple[Any, str]:
    """An MLflow client of the configured registry and the id of the configured experiment (created if missing)."""
    from defectops.registry import mlflow_registry as reg

    c = reg.client(tracking_uri(registry, ctx.home))
    exp = reg.ensure_experiment(c, registry.experiment, artifact_location(registry, ctx.home))
    return c, exp


def mlflow_run(ctx: StepContext, registry: RegistryConfig) -> tuple[Any, str]:
    """The run's MLflow run (started once and recorded in the run root, so every step and a rerun log to it)."""
    from defectops.registry import mlflow_registry as reg

    c, exp = registry_client(ctx, registry)
    f = ctx.path(RUN.mlflow_run)
    existing = read_json(f)["run_id"] if f.is_file() else None
    rid = reg.start_run(c, exp, ctx.run_id, existing, {T.RUN_ID: ctx.run_id, T.CONFIG_HASH: ctx.config_hash})
    if rid != existing:
        write_json(f, {"run_id": rid, "tracking_uri": c.tracking_uri})
    return c, rid


def git_commit() -> str:
    """The commit of the code that runs, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_user() -> str:
    """Who is acting: $DEFECTOPS_USER, else the operating-system user."""
    return os.environ.get("DEFECTOPS_USER") or getpass.getuser()


def boards_of(ctx: StepContext) -> dict[str, Any]:
    """The run's accepted val and test board pairs (:class:`serving.board_eval.BoardSplit` per split)."""
    from defectops.serving.board_eval import board_split

    snap = load_snapshot(ctx.path(RUN.snapshot))
    quarantined = {q["index"] for q in read_json(ctx.path(RUN.validation))["quarantined"]}
    return {split: board_split(snap, quarantined, split) for split in ("val", "test")}


def evaluate_boards(ctx: StepContext, data: DataConfig, detect: DetectConfig, classes: tuple[str, ...],
                    logits_fn: Callable[[np.ndarray], np.ndarray], threshold: float | None, confidence: float,
                    type_thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """The board-level evaluation (:func:`serving.board_eval.board_evaluation`) of a logits function on this run's
    boards, with the step's progress bars; thresholds are chosen on val when ``threshold`` is None."""
    from defectops.serving.board_eval import board_evaluation, detector_settings

    settings = detector_settings(classes, data.good_class, data.candidates, detect)
    try:
        return board_evaluation(boards_of(ctx), settings, detect, logits_fn, threshold, confidence=confidence,
                                type_thresholds=type_thresholds, progress=ctx.reporter.task)
    except ValueError as e:
        raise StepError(str(e)) from None
