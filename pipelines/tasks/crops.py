"""What candidate verification and folder classification share: a crop classifier (:class:`CropClassifierTask`).

Training is the crop classifier's (:mod:`training.trainer`); evaluation, export and its verification are in
:mod:`.crop_evaluate`, :mod:`.crop_export` and :mod:`.crop_verify`. A subclass adds its own scoring of the model
beyond the test crops (``detection_scores``: the board-level detector) and what the exported model carries with it
(``export_metadata``).
"""

from __future__ import annotations

from abc import ABC
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core.fsutil import atomic_path, read_json
from defectops.core.layout import RUN
from defectops.evaluation.gates import GateConfig
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import EvaluateResult, ExportResult, TrainResult, VerifyExportResult
from defectops.pipelines.tasks.base import Task
from defectops.pipelines.tasks.crop_evaluate import LogitsFn
from defectops.pipelines.tracking import mlflow_run
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.training.config import DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import load_snapshot


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
        from defectops.training.trainer import CheckpointError, fit, load_checkpoint

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
            try:
                state = load_checkpoint(result.checkpoint)  # torch.load(weights_only=True): no code runs from it
            except CheckpointError as e:
                raise StepError(str(e)) from None
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


    def detection_scores(self, ctx: StepContext, data: DataConfig, detect: DetectConfig, classes: tuple[str, ...],
                         logits_fn: LogitsFn, confidence: float, chosen: dict[str, Any] | None = None
                         ) -> dict[str, Any] | None:
        """The task's own evaluation of the classifier beyond its test crops (``None``: it has none). ``chosen`` holds
        the settings selected when the checkpoint was evaluated (thresholds), to apply unchanged to an export."""
        return None

    def export_metadata(self, ctx: StepContext) -> dict[str, Any]:
        """What the exported model carries besides classes and input size (e.g. the detector's settings)."""
        return {}

    def evaluate(self, ctx: StepContext, data: DataConfig, gates: GateConfig, registry: RegistryConfig,
                 detect: DetectConfig) -> EvaluateResult:
        from defectops.pipelines.tasks.crop_evaluate import evaluate_crop_classifier

        return evaluate_crop_classifier(self.detection_scores, ctx, data, gates, registry, detect)

    def save_model(self, ctx: StepContext, out: Path) -> None:
        """The registered format (:mod:`training.models.model_format`): the weights as safetensors and a JSON of the
        registry name and constructor kwargs; loading it runs no code from the artifact store."""
        from defectops.training.models.model_format import save_registered_classifier
        from defectops.training.trainer import load_trained_model

        net, state = load_trained_model(ctx.path(RUN.model))
        classes = [str(c) for c in state["classes"]]
        save_registered_classifier(net, out, model_name=str(state["model_name"]), num_classes=len(classes),
                                   img_size=int(state["img_size"]), classes=classes,
                                   in_chans=int(state.get("in_chans", 3)), tta=str(state.get("model_tta", "none")),
                                   kwargs=state.get("model_kwargs") or {},
                                   extra={"task": self.model_task, "epoch": int(state.get("epoch", 0)),
                                          "weights_info": state.get("weights_info") or {}})

    def drift_reference(self, ctx: StepContext, data: DataConfig, out: Path) -> None:
        """Penultimate-layer embeddings and class probabilities of the held-out (val + test) crops."""
        from defectops.evaluation.drift_profile import profile_from_images, reduce_reference, save_profile
        from defectops.training.data import load_split
        from defectops.training.trainer import load_trained_model

        crops = load_snapshot(ctx.path(RUN.crops))
        parts = [p for p in (load_split(crops, sp) for sp in ("val", "test")) if len(p[1])]
        if not parts:
            raise StepError("no held-out crops to profile for drift checks: the val and test splits are empty")
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        net, state = load_trained_model(ctx.path(RUN.model))
        profile = reduce_reference(profile_from_images(net, images, crops.classes, self.model_task, labels=labels))
        meta_file = ctx.path(RUN.crops) / "snapshot.json"
        fit = (read_json(meta_file).get("fit") or {}) if meta_file.is_file() else {}
        save_profile(out, profile, {
            "run_id": ctx.run_id, "model_name": str(state.get("model_name")), "task": self.model_task,
            "good_class": data.good_class, "input_size": int(state["img_size"]),
            "fit_mode": fit.get("mode", data.fit_mode), "splits": ["val", "test"],
            "dataset_fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint,
            "crops_fingerprint": crops.fingerprint,
            "data": {"source": data.source, "root": data.root or ""}})

    def export(self, ctx: StepContext, export: ExportConfig, data: DataConfig) -> ExportResult:
        from defectops.pipelines.tasks.crop_export import export_crop_classifier

        return export_crop_classifier(self.model_task, self.export_metadata(ctx), ctx, export, data)

    def verify_export(self, ctx: StepContext, data: DataConfig, export: ExportConfig, gates: GateConfig,
                      registry: RegistryConfig, detect: DetectConfig) -> VerifyExportResult:
        from defectops.pipelines.tasks.crop_verify import verify_crop_classifier

        return verify_crop_classifier(self.detection_scores, ctx, data, export, gates, registry, detect)
