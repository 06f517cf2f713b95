"""What each step returns: a frozen :class:`StepResult` dataclass per step, recorded by the runner as ``to_dict()``
in the step marker (``RUN.marker(step)``). They live together, apart from the steps, because a step's result is made
by the configured task (:mod:`pipelines.tasks`), which the steps call; a task whose step records more subclasses
the step's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from defectops.pipelines.context import StepResult

__all__ = ["EvaluateResult", "ExportResult", "PullDataResult", "RegisterResult", "StepResult", "TrainResult",
           "ValidateDataResult", "VerifyExportResult"]


@dataclass(frozen=True)
class PullDataResult(StepResult):
    """The snapshot written: its fingerprint, sample counts per split, the classes and the split groups."""

    fingerprint: str
    samples: int
    splits: dict[str, int]
    files_root: str
    classes: list[str]
    groups: dict[str, dict[str, int]]
    duplicates: dict[str, int] | None = None
    """Counts of the duplicate groups found at import (``RUN.duplicates`` lists them), when the source checks."""


@dataclass(frozen=True)
class ValidateDataResult(StepResult):
    """Quarantine counts, the training-sample snapshot's fingerprint, what the task made and the shortcut check."""

    quarantined: int
    accepted: int
    label_conflicts: int
    crop_fingerprint: str
    prepared: dict[str, Any]
    """The task's own counts (:attr:`pipelines.tasks.base.Prepared.summary`: crops per split, candidate recall, ...)."""
    shortcut: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainResult(StepResult):
    """The train step's result. A task whose fit records more (a memory bank's size, say) subclasses it."""

    epochs: int
    resumed_from_epoch: int
    mlflow_run_id: str | None = None
    selected_epoch: int | None = None
    select: str | None = None
    selected: dict[str, float] | None = None
    """The selected epoch's history row (its validation figures)."""
    final: dict[str, float] | None = None
    class_counts: dict[str, int] | None = None
    pretrained: dict[str, Any] | None = None
    """Which pretrained weights the backbone started from (file and sha256), when any."""
    nproc: int | None = None
    """Processes that trained (DistributedDataParallel), when more than one."""
    rank: int | None = None
    """Set only in a non-zero rank's own result (never recorded: rank 0 alone writes the marker)."""


@dataclass(frozen=True)
class EvaluateResult(StepResult):
    """Whether the gates passed (and which failed), the headline figure, the champion compared with, and the board-level
    figures for a board task."""

    passed: bool
    failed: list[str]
    macro_recall: float
    champion_version: str
    board: dict[str, Any] | None = None


@dataclass(frozen=True)
class RegisterResult(StepResult):
    """The registered version (also written to ``RUN.registration``) and whether it passed its gates."""

    registered_model: str
    version: str
    aliases: list[str]
    tracking_uri: str
    mlflow_run_id: str
    gates_passed: bool


@dataclass(frozen=True)
class ExportResult(StepResult):
    """The ONNX file written and, with ``export.int8.enabled``, the INT8 file and its calibration."""

    onnx_path: str
    opset: int
    bytes: int
    int8: dict[str, Any] | None = None


@dataclass(frozen=True)
class VerifyExportResult(StepResult):
    """ONNX-vs-checkpoint parity, the ONNX model's figures, what Triton serves (``fp32`` | ``int8``) and the INT8
    verdict. :mod:`serving.model_ref` reads ``served`` and ``int8.publish`` back from the step marker."""

    parity: dict[str, Any]
    onnx_macro_recall: float
    triton_model: str
    served: str
    int8: dict[str, Any] | None = None
    onnx_board: dict[str, Any] | None = None
