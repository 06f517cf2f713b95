"""The task interface: what a kind of model needs from the pipeline's steps, so that the steps dispatch on the
configured ``task`` (:class:`core.taxonomy.TaskKind`) instead of branching on what the data files look like.

One method per stage of the DAG: a task checks a snapshot suits it and turns the validated samples into training
samples (``check_snapshot``, ``prepare``), says which metadata the shortcut check should test (``shortcut_inputs``),
trains (``fit``), scores the test split and writes metrics, gates, report and review evidence (``evaluate``), saves
its model for the registry and profiles its held-out data for drift checks (``save_model``, ``drift_reference``),
exports (``export``) and re-validates the export before publishing it to Triton (``verify_export``). The steps keep
what every task shares: reading the configuration, registration and its governance, step markers.

Both tasks of today classify crops: they share :class:`pipelines.tasks.crops.CropClassifierTask`, whose own hooks
(``detection_scores``, ``export_metadata``) are where candidate verification adds the board detector. A task that is
not a crop classifier (anomaly detection) implements :class:`Task` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from defectops.core.taxonomy import TaskKind
from defectops.evaluation.gates import GateConfig
from defectops.pipelines.context import StepContext
from defectops.pipelines.results import EvaluateResult, ExportResult, TrainResult, VerifyExportResult
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.training.config import AnomalyConfig, DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import Snapshot


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` made: the training-sample snapshot (``RUN.crops``) and the step result's task-specific part."""

    crops: Snapshot
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShortcutInputs:
    """Metadata features of the train and val samples for the shortcut check, and the fix to advise when they predict
    the class."""

    features: np.ndarray
    names: list[str]
    fix: str


class Task(ABC):
    """One kind of model the pipeline trains, gates, registers and exports."""

    kind: ClassVar[TaskKind]
    model_task: ClassVar[str]
    """The task's name in the exported model's metadata and the drift profile (a contract with serving: ``aoi`` or
    ``folder``)."""
    prepare_label: ClassVar[str]
    """Progress-bar text of ``prepare``."""
    shortcut_metadata: ClassVar[str]
    """What the shortcut check's features describe, in words."""

    @classmethod
    def from_config(cls, *, anomaly: AnomalyConfig) -> Task:
        """The task with the settings it takes from the configuration (the crop classifiers take none here: their
        settings reach them through the steps' sub-configs)."""
        return cls()

    @abstractmethod
    def check_snapshot(self, snap: Snapshot) -> None:
        """Raise :class:`StepError` (naming the fix) when the snapshot's samples do not suit this task."""

    @abstractmethod
    def prepare(self, snap: Snapshot, accepted: Sequence[int], out: Path, data: DataConfig,
                progress: Callable[[int], None]) -> Prepared:
        """Training samples from the accepted samples of ``snap``, written into ``out`` (a fresh folder)."""

    @abstractmethod
    def shortcut_inputs(self, snap: Snapshot, used: Sequence[dict[str, Any]]) -> ShortcutInputs:
        """Metadata of the crops ``used`` (train and val) that must not predict their class."""

    @abstractmethod
    def fit(self, ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig,
            registry: RegistryConfig, seed: int) -> TrainResult:
        """Train; write ``RUN.model``. Returns the train step's result."""

    @abstractmethod
    def evaluate(self, ctx: StepContext, data: DataConfig, gates: GateConfig, registry: RegistryConfig,
                 detect: DetectConfig) -> EvaluateResult:
        """Score ``RUN.model`` on the test split against the champion; write ``RUN.metrics`` (with ``macro_recall``,
        ``escape_rate``, ``false_call_rate``), ``RUN.gates`` (a :class:`evaluation.gates.GateReport`),
        ``RUN.report`` and ``RUN.misses`` (review evidence)."""

    @abstractmethod
    def save_model(self, ctx: StepContext, out: Path) -> None:
        """Save ``RUN.model`` into ``out`` (a fresh folder) as the registry's ``model`` artifact."""

    @abstractmethod
    def drift_reference(self, ctx: StepContext, data: DataConfig, out: Path) -> None:
        """Write the reference profile of the held-out data into ``out`` (:mod:`evaluation.drift_profile`)."""

    @abstractmethod
    def export(self, ctx: StepContext, export: ExportConfig, data: DataConfig) -> ExportResult:
        """Write ``RUN.onnx`` (and ``RUN.onnx_int8`` when configured) carrying what serving needs."""

    @abstractmethod
    def verify_export(self, ctx: StepContext, data: DataConfig, export: ExportConfig, gates: GateConfig,
                      registry: RegistryConfig, detect: DetectConfig) -> VerifyExportResult:
        """Re-validate the export like the checkpoint (parity, the same gates), tag the version with the verdicts and
        write ``RUN.triton``; raise :class:`pipelines.context.StepError` when it does not hold."""
