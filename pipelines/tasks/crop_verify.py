"""A crop classifier's export verification (:meth:`CropClassifierTask.verify_export`): re-evaluate the exported
model through onnxruntime (parity with PyTorch and the same gates, board-level too), decide whether the INT8 copy may be
published, tag the model version with the verdicts and write the Triton model repository. A failure removes the
``challenger`` alias.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core import tags as T
from defectops.core.fsutil import read_json, write_json
from defectops.core.layout import RUN
from defectops.evaluation.gates import GateConfig
from defectops.evaluation.metrics import ClassificationMetrics
from defectops.evaluation.scoring import Scored, score_crops
from defectops.pipelines.context import StepContext
from defectops.pipelines.results import VerifyExportResult
from defectops.pipelines.tasks.crop_evaluate import DetectionScores
from defectops.pipelines.tracking import publish_verified, record_export_verdict
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.serving.onnx_export import Parity
from defectops.training.config import DataConfig
from defectops.training.snapshot import load_snapshot, resampling_units


@dataclass(frozen=True)
class _Checked:
    """An ONNX artifact scored like the checkpoint: parity with its logits, crop scores and gates, board scores."""

    parity: Parity
    scored: Scored
    board: dict[str, Any] | None


def _check_onnx(ctx: StepContext, model: Path, detect_fn: DetectionScores, data: DataConfig, gates: GateConfig,
                detect: DetectConfig, classes: tuple[str, ...], x: np.ndarray, y: np.ndarray, units: list[str],
                ref_logits: np.ndarray, champion: ClassificationMetrics | None) -> _Checked:
    from defectops.serving.onnx_export import onnx_logits, onnx_session, parity
    from defectops.training.data import to_tensor

    session = onnx_session(model)
    logits = onnx_logits(session, to_tensor(x).numpy())
    board = None
    if ctx.path(RUN.detector).is_file():  # the settings the checkpoint's evaluation chose, applied unchanged
        board = detect_fn(ctx, data, detect, classes, lambda b: onnx_logits(session, b), gates.confidence,
                                      chosen=read_json(ctx.path(RUN.detector)))
    scored = score_crops(logits, y, classes, data.good_class, units, gates, champion=champion,
                         board=board.get("test") if board else None)
    return _Checked(parity(ref_logits, logits), scored, board)


def verify_crop_classifier(detect_fn: DetectionScores, ctx: StepContext, data: DataConfig, export: ExportConfig,
                           gates: GateConfig, registry: RegistryConfig, detect: DetectConfig) -> VerifyExportResult:
    """Re-evaluate the ONNX model through onnxruntime: parity with PyTorch and the same gates; then publish it as a
    Triton model repository. A failure removes the challenger alias."""
    from defectops.serving.triton import write_repository
    from defectops.training.data import load_split

    crops = load_snapshot(ctx.path(RUN.crops))
    x, y, paths = load_split(crops, "test")
    ref = np.load(ctx.path(RUN.predictions))["logits"]
    baseline = ctx.path(RUN.champion_metrics)
    champion = ClassificationMetrics.from_dict(read_json(baseline)) if baseline.is_file() else None
    units = resampling_units(crops, paths)
    fp32 = _check_onnx(ctx, ctx.path(RUN.onnx), detect_fn, data, gates, detect, crops.classes, x, y, units, ref,
                       champion)
    par, report = fp32.parity, fp32.scored.gates
    if fp32.board is not None:
        write_json(ctx.path(RUN.onnx_board_metrics), fp32.board)
    write_json(ctx.path(RUN.parity), par.to_dict())
    write_json(ctx.path(RUN.onnx_metrics), fp32.scored.metrics_doc())
    write_json(ctx.path(RUN.onnx_gates), report.to_dict())
    problems = []
    if par.top1_agreement < export.min_top1_agreement:
        problems.append(f"top-1 agreement {par.top1_agreement:.4f} < export.min_top1_agreement "
                        f"{export.min_top1_agreement}")
    if par.max_abs_logit_diff > export.max_logit_diff:
        problems.append(f"max logit difference {par.max_abs_logit_diff:.2e} > export.max_logit_diff "
                        f"{export.max_logit_diff}")
    problems += [f"ONNX gate {g.name} ({g.detail})" for g in report.failed()]
    c, rid, version = record_export_verdict(ctx, registry, {
        T.ONNX_TOP1_AGREEMENT: f"{par.top1_agreement:.6f}", T.ONNX_MAX_LOGIT_DIFF: f"{par.max_abs_logit_diff:.3e}",
        T.ONNX_GATES_PASSED: str(report.passed).lower(), T.EXPORT_VERIFIED: str(not problems).lower()}, problems)
    int8 = None
    if export.int8.enabled and ctx.path(RUN.onnx_int8).is_file():
        int8 = _verify_int8(ctx, detect_fn, data, export, gates, detect, x, y, ref, crops.classes, champion, units)
    served, precision = publish_verified(ctx, c, rid, registry, version, export.serve, int8)
    size = int(x.shape[1])
    model_dir = write_repository(ctx.path(RUN.triton), registry.model_name, served, crops.classes,
                                 (3, size, size), export.triton, version=int(version))
    return VerifyExportResult(
        par.to_dict(), fp32.scored.metrics.macro_recall, str(model_dir), precision,
        {k: int8[k] for k in ("publish", "macro_recall", "macro_recall_drop", "top1_agreement", "reasons")}
        if int8 else None,
        {k: fp32.board["test"][k] for k in ("map", "fscore", "images_per_s")}
        if fp32.board and "test" in fp32.board else None)


def _verify_int8(ctx: StepContext, detect_fn: DetectionScores, data: DataConfig, export: ExportConfig,
                 gates: GateConfig, detect: DetectConfig, x: np.ndarray, y: np.ndarray, ref_logits: np.ndarray,
                 classes: tuple[str, ...], champion: ClassificationMetrics | None, units: list[str]) -> dict[str, Any]:
    """Evaluate the INT8 model like the checkpoint (same crops, same gates, board-level too) and decide whether it may
    be published (:func:`serving.quantize.int8_verdict`); writes ``RUN.int8_report``."""
    from defectops.serving.quantize import int8_verdict

    checked = _check_onnx(ctx, ctx.path(RUN.onnx_int8), detect_fn, data, gates, detect, classes, x, y, units,
                          ref_logits, champion)
    par, scored, board = checked.parity, checked.scored, checked.board
    reference = ClassificationMetrics.from_dict(read_json(ctx.path(RUN.metrics)))
    verdict = int8_verdict(reference.macro_recall, scored.metrics.macro_recall, par.top1_agreement,
                           [f"{g.name} ({g.detail})" for g in scored.gates.failed()],
                           export.int8.max_macro_recall_drop)
    out = {**verdict.to_dict(), "macro_recall": scored.metrics.macro_recall,
           "reference_macro_recall": reference.macro_recall, "parity": par.to_dict(),
           "metrics": scored.metrics_doc(), "gates": scored.gates.to_dict()}
    if board and "test" in board:
        out["board"] = {k: board["test"][k] for k in ("map", "fscore", "images_per_s", "intervals")}
    write_json(ctx.path(RUN.int8_report), out)
    return out
