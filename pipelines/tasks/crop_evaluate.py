"""A crop classifier's evaluation (:meth:`CropClassifierTask.evaluate`): score the trained model on the test crops
(and the task's own detection scores: boards), compare with the champion, apply the gates, and write the metrics, the
gate table, the predictions, the worst-miss tiles and the HTML report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from defectops.core.fsutil import atomic_path, write_json
from defectops.core.layout import RUN
from defectops.evaluation.gates import GateConfig
from defectops.evaluation.metrics import ClassificationMetrics, classification_metrics, pr_curves
from defectops.evaluation.report import render_report, write_miss_tiles
from defectops.evaluation.report_sections import board_html, gradcam_misses, read_shortcut, read_validation, split_note
from defectops.evaluation.scoring import Scored, score_crops
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import EvaluateResult
from defectops.pipelines.tracking import registry_client
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig
from defectops.training.config import DataConfig
from defectops.training.snapshot import Snapshot, load_snapshot, resampling_units
from defectops.training.trainer import resolve_device

LogitsFn = Callable[[np.ndarray], np.ndarray]


class DetectionScores(Protocol):
    """:meth:`CropClassifierTask.detection_scores`: a task's evaluation of the classifier beyond its test crops."""

    def __call__(self, ctx: StepContext, data: DataConfig, detect: DetectConfig, classes: tuple[str, ...],
                 logits_fn: LogitsFn, confidence: float, chosen: dict[str, Any] | None = None
                 ) -> dict[str, Any] | None: ...


def evaluate_crop_classifier(detect_fn: DetectionScores, ctx: StepContext, data: DataConfig,
                             gates: GateConfig, registry: RegistryConfig, detect: DetectConfig) -> EvaluateResult:
    """Score the trained model on the test crops (and the task's own evaluation: boards), apply the gates, write
    metrics and the HTML report."""
    import torch

    from defectops.training.data import load_split, to_tensor
    from defectops.training.engine import predict_logits
    from defectops.training.trainer import CheckpointError, load_trained_model

    crops = load_snapshot(ctx.path(RUN.crops))
    x, y, paths = load_split(crops, "test")
    if len(y) == 0:
        raise StepError("the test split has no crops: add boards (data.synth.n_boards) or raise data.split.test")
    try:
        net, state = load_trained_model(ctx.path(RUN.model))
    except CheckpointError as e:
        raise StepError(str(e)) from None
    logits = predict_logits(net, to_tensor(x), resolve_device("cpu"))
    champion, champion_version = _champion_metrics(ctx, registry, x, y, crops.classes, data.good_class)
    if champion is not None:
        write_json(ctx.path(RUN.champion_metrics), champion.to_dict())

    def torch_logits(batch: np.ndarray) -> np.ndarray:
        return predict_logits(net, torch.from_numpy(batch), resolve_device("cpu"))

    board = detect_fn(ctx, data, detect, crops.classes, torch_logits, gates.confidence)
    if board is not None:
        write_json(ctx.path(RUN.board_metrics), board)
        write_json(ctx.path(RUN.detector), {"score_threshold": board["score_threshold"],
                                            "type_thresholds": board["type_thresholds"], **board["settings"]})
    scored = score_crops(logits, y, crops.classes, data.good_class, resampling_units(crops, paths), gates,
                         champion=champion, board=board.get("test") if board else None)
    with atomic_path(ctx.path(RUN.predictions)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, logits=logits, labels=y, paths=np.asarray(paths))
    write_json(ctx.path(RUN.metrics), scored.metrics_doc())
    write_json(ctx.path(RUN.gates), scored.gates.to_dict())
    _write_report(ctx, net, scored, y, x, crops, state, champion_version, board)
    summary: dict[str, Any] | None = None
    if board and "test" in board:
        summary = {k: board["test"][k] for k in ("map", "fscore", "precision", "recall", "images_per_s")}
        summary["score_threshold"] = board["score_threshold"]
        if board["type_thresholds"]:
            summary["type_thresholds"] = board["type_thresholds"]
    return EvaluateResult(scored.gates.passed, [g.name for g in scored.gates.failed()], scored.metrics.macro_recall,
                          champion_version, summary)


def _champion_metrics(ctx: StepContext, registry: RegistryConfig, x: np.ndarray, y: np.ndarray,
                      classes: tuple[str, ...], good_class: str) -> tuple[ClassificationMetrics | None, str]:
    """Score the current champion on this run's test crops (a like-for-like no-regression baseline)."""
    from defectops.registry import mlflow_registry as reg
    from defectops.training.data import to_tensor
    from defectops.training.engine import predict_logits, softmax
    from defectops.training.models.model_format import load_registered_model

    c, _ = registry_client(ctx, registry)
    mv = reg.alias_version(c, registry.model_name, registry.champion_alias)
    if mv is None:
        return None, "none (no champion yet)"
    label = f"version {mv.version}"
    try:
        uri = c.get_model_version_download_uri(registry.model_name, str(mv.version))
        net = load_registered_model(uri, tracking_uri=c.tracking_uri)  # refuses a pickled version (opt-in: env)
        logits = predict_logits(net, to_tensor(x), resolve_device("cpu"))
    except Exception as e:  # noqa: BLE001 - an unloadable champion is reported, and the regression gates are then not applied
        return None, f"{label} could not be evaluated ({type(e).__name__}: {str(e)[:120]})"
    if logits.shape[1] != len(classes):
        return None, f"{label} has {logits.shape[1]} classes, this run {len(classes)}: not comparable"
    return classification_metrics(y, softmax(logits), classes, good_class), label


def _write_report(ctx: StepContext, net: Any, scored: Scored, y: np.ndarray, x: np.ndarray, crops: Snapshot,
                  state: dict[str, Any], champion_version: str, board: dict[str, Any] | None) -> None:
    misses = gradcam_misses(net, str(state["model_name"]), x, y, scored.probs, crops.classes)
    info = {"run id": ctx.run_id, "model": str(state.get("model_name")), "epochs": str(state.get("epoch")),
            "dataset fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint[:16],
            "test crops": str(len(y)), "champion compared": champion_version}
    sections = [("Board-level detection (DeepPCB metric)", board_html(board))] if board else []
    write_miss_tiles(ctx.path(RUN.misses), misses)
    render_report(ctx.path(RUN.report), title=f"DefectOps evaluation: {ctx.run_id}", metrics=scored.metrics,
                  gates=scored.gates, curves=pr_curves(y, scored.probs, crops.classes), info=info, misses=misses,
                  sections=sections, intervals=scored.intervals, split_note=split_note(len(y), scored.intervals),
                  shortcut=read_shortcut(ctx.path(RUN.shortcut)), quarantine=read_validation(ctx.path(RUN.validation)))
