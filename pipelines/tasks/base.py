"""The task interface: what a kind of model needs from the pipeline's steps, so that the steps dispatch on the
configured ``task`` (:class:`core.taxonomy.TaskKind`) instead of branching on what the data files look like.

A task turns a validated snapshot into training samples (``prepare``), says which metadata the shortcut check should
test (``shortcut_inputs``), trains (``fit``), adds its own evaluation of an artifact beyond the test crops
(``detection_scores``: the board-level detector for candidate verification), and names itself in the exported model's
metadata (``model_task``) and the extras that go with it (``export_metadata``).

Both tasks of today classify crops: they share :class:`CropClassifierTask` (fit = the crop classifier's training).
A task that is not a crop classifier (anomaly detection) implements :class:`Task` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from defectops.core.fsutil import atomic_path
from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.pipelines.context import StepContext, StepError, StepResult
from defectops.pipelines.tracking import mlflow_run
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig
from defectops.training.config import DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import Snapshot, load_snapshot

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` made: the training-sample snapshot (``RUN.crops``) and the step result's task-specific part."""

    crops: Snapshot
    summary: dict[str, Any] = field(default_factory=dict)


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

    def detection_scores(self, ctx: StepContext, data: DataConfig, detect: DetectConfig, classes: tuple[str, ...],
                         logits_fn: LogitsFn, confidence: float, chosen: dict[str, Any] | None = None
                         ) -> dict[str, Any] | None:
        """The task's own evaluation of an artifact beyond its test crops (``None``: it has none). ``chosen`` holds
        the settings selected when the checkpoint was evaluated (thresholds), to apply unchanged to an export."""
        return None

    def export_metadata(self, ctx: StepContext) -> dict[str, Any]:
        """What the exported model carries besides classes and input size (e.g. the detector's settings)."""
        return {}


class CropClassifierTask(Task, ABC):
    """A task whose model classifies fixed-size crops (candidate verification, folder classification)."""

    def fit(self, ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig,
            registry: RegistryConfig, seed: int) -> TrainResult:
        """Train the crop classifier on ``RUN.crops`` (this process's share under DDP); rank 0 writes
        ``RUN.model`` and logs to the run's MLflow run. Returns the train step's result."""
        import torch

        from defectops.registry import mlflow_registry as reg
        from defectops.training import distributed
        from defectops.training.data import class_counts, load_split
        from defectops.training.trainer import CheckpointError, fit

        main, world = distributed.rank() == 0, distributed.world_size()
        crops = load_snapshot(ctx.path(RUN.crops))
        x_train, y_train, _ = load_split(crops, "train")
        x_val, y_val, _ = load_split(crops, "val")
        c: Any = None
        rid = ""
        if main:
            c, rid = mlflow_run(ctx, registry)
            reg.log_params(c, rid, {"model": model.name, "epochs": train.epochs, "batch_size": train.batch_size,
                                    "lr": train.lr, "sampler": train.sampler, "loss": train.loss.name,
                                    "gamma": train.loss.gamma, "seed": seed, "train_samples": len(y_train),
                                    "nproc": world,
                                    "dataset_fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint})
        n = len(y_train)
        per_epoch = n // train.batch_size * train.batch_size if n > train.batch_size else n
        advance = ctx.reporter.task(f"training {model.name}" + (f" on {world} processes" if world > 1 else ""),
                                    train.epochs * per_epoch) if main else (lambda n: None)

        def on_epoch(epoch: int, stats: dict[str, float]) -> None:
            for k, v in stats.items():
                if k != "epoch":
                    c.log_metric(rid, f"train_{k}" if not k.startswith("val_") else k, float(v), step=epoch)
            ctx.reporter.log(f"epoch {epoch}/{train.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()
                                                                         if k != "epoch"))

        try:
            result = fit(x_train, y_train, crops.classes, model, train, ctx.path(RUN.checkpoints), seed=seed,
                         val=(x_val, y_val), on_epoch=on_epoch, on_batch=advance if world == 1 else
                         (lambda n: advance(n * world)))
        except CheckpointError as e:
            raise StepError(str(e)) from None
        if not main:
            return TrainResult(len(result.history), result.resumed_from, rank=distributed.rank())
        if result.resumed_from:
            advance(result.resumed_from * per_epoch)
        with atomic_path(ctx.path(RUN.model)) as tmp:
            state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
            for k in ("optimizer", "scheduler"):
                state.pop(k, None)
            torch.save(state, tmp)
        weights = state.get("weights_info") or {}
        reg.log_params(c, rid, {"selected_epoch": result.selected_epoch,
                                "pretrained_weights": weights.get("weights", "none"),
                                "pretrained_sha256": weights.get("weights_sha256", "none")})
        return TrainResult(len(result.history), result.resumed_from, mlflow_run_id=rid,
                           selected_epoch=result.selected_epoch, select=str(train.select),
                           selected=result.history[result.selected_epoch - 1] if result.selected_epoch else {},
                           final=result.history[-1] if result.history else {},
                           class_counts=class_counts(y_train, crops.classes), pretrained=weights or None,
                           nproc=world if world > 1 else None)

