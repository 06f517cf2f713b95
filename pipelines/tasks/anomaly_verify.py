"""An anomaly model's export verification (:meth:`AnomalyTask.verify_export`): the ONNX model re-scores the val and test
images through onnxruntime; every image score must agree with the checkpoint's within ``anomaly.max_score_rel_diff``
(relative to the checkpoint's score), no decision at the threshold may flip, and the test split must pass the same gates
at the same threshold. Then the version is tagged and the Triton repository written (two outputs: ``scores``,
``anomaly_map``); otherwise the challenger alias is removed and the step fails with the reasons.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from defectops.core import tags as T
from defectops.core.fsutil import read_json, write_json
from defectops.core.layout import RUN
from defectops.evaluation.gates import GateConfig
from defectops.evaluation.metrics import ClassificationMetrics
from defectops.pipelines.context import StepContext
from defectops.pipelines.results import VerifyExportResult
from defectops.pipelines.tasks.anomaly_scoring import OUTPUTS, judge, score_split
from defectops.pipelines.tracking import record_export_verdict
from defectops.registry.config import RegistryConfig
from defectops.serving.config import ExportConfig
from defectops.training.config import AnomalyConfig, DataConfig
from defectops.training.snapshot import load_snapshot


def score_parity(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> dict[str, Any]:
    """How far the export's image scores are from the checkpoint's: the largest relative difference and the number
    of decisions (``score >= threshold``) that differ."""
    ref = np.asarray(reference, np.float64)
    cand = np.asarray(candidate, np.float64)
    rel = np.abs(cand - ref) / np.maximum(np.abs(ref), 1e-12)
    flips = int(((ref >= threshold) != (cand >= threshold)).sum())
    return {"n": len(ref), "max_rel_diff": float(rel.max()) if len(rel) else 0.0,
            "max_abs_diff": float(np.abs(cand - ref).max()) if len(ref) else 0.0, "decision_flips": flips,
            "top1_agreement": 1.0 - flips / max(1, len(ref))}


def verify_anomaly_export(cfg: AnomalyConfig, ctx: StepContext, data: DataConfig, export: ExportConfig,
                          gates: GateConfig, registry: RegistryConfig) -> VerifyExportResult:
    from defectops.serving.onnx_export import onnx_session
    from defectops.serving.triton import write_repository

    crops = load_snapshot(ctx.path(RUN.crops))
    session = onnx_session(ctx.path(RUN.onnx))

    def onnx_scorer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from defectops.training.data import to_tensor

        scores, maps = session.run(list(OUTPUTS), {"images": to_tensor(images).numpy()})
        return np.asarray(scores).reshape(-1), np.asarray(maps)

    try:
        val = score_split(crops, "val", onnx_scorer, cfg)
        test = score_split(crops, "test", onnx_scorer, cfg)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; an export that cannot score is refused
        problem = (f"the ONNX model fails on batches of up to {cfg.batch_size} val/test images "
                   f"({type(e).__name__}: {str(e).strip()[:200]})")
        write_json(ctx.path(RUN.parity), {"error": problem})
        record_export_verdict(ctx, registry, {T.EXPORT_VERIFIED: "false"}, [problem], "exported anomaly model")
        raise AssertionError("unreachable: record_export_verdict raises on problems") from None
    pred = np.load(ctx.path(RUN.predictions))
    judged_doc = read_json(ctx.path(RUN.anomaly))
    threshold = float(judged_doc["threshold"]["value"])
    par = score_parity(np.concatenate([pred["val_scores"], pred["scores"]]), np.concatenate([val.scores, test.scores]),
                       threshold)
    baseline = ctx.path(RUN.champion_metrics)
    champion = ClassificationMetrics.from_dict(read_json(baseline)) if baseline.is_file() else None
    judged = judge(val, test, crops, cfg, data.good_class, gates, champion)
    write_json(ctx.path(RUN.parity), par)
    write_json(ctx.path(RUN.onnx_metrics), {**judged.scored.metrics_doc(), "anomaly": judged.doc})
    write_json(ctx.path(RUN.onnx_gates), judged.scored.gates.to_dict())
    problems = []
    if par["max_rel_diff"] > cfg.max_score_rel_diff:
        problems.append(f"image scores differ from the checkpoint's by up to {par['max_rel_diff']:.2e} (relative) > "
                        f"anomaly.max_score_rel_diff {cfg.max_score_rel_diff}")
    if par["decision_flips"]:
        problems.append(f"{par['decision_flips']} of {par['n']} decisions at the threshold differ from the "
                        "checkpoint's")
    problems += [f"ONNX gate {g.name} ({g.detail})" for g in judged.scored.gates.failed()]
    _, _, version = record_export_verdict(ctx, registry, {
        T.ONNX_TOP1_AGREEMENT: f"{par['top1_agreement']:.6f}", T.ONNX_MAX_LOGIT_DIFF: f"{par['max_abs_diff']:.3e}",
        T.ONNX_GATES_PASSED: str(judged.scored.gates.passed).lower(), T.EXPORT_VERIFIED: str(not problems).lower(),
        T.SERVED_PRECISION: "fp32"}, problems, "exported anomaly model")
    h, w = (int(v) for v in task_input_hw(ctx))
    model_dir = write_repository(ctx.path(RUN.triton), registry.model_name, ctx.path(RUN.onnx), crops.classes,
                                 (3, h, w), export.triton, version=int(version))  # outputs from the ONNX file
    return VerifyExportResult(par, judged.scored.metrics.macro_recall, str(model_dir), "fp32")


def task_input_hw(ctx: StepContext) -> tuple[int, int]:
    meta = read_json(ctx.path(RUN.crops) / "snapshot.json")
    h, w = meta["fit"]["size"]
    return int(h), int(w)
