"""An anomaly model's export verification (:meth:`AnomalyTask.verify_export`): the ONNX model re-scores the val and test
images through onnxruntime; every image score must agree with the checkpoint's within ``anomaly.max_score_rel_diff``
(relative to the checkpoint's score), no decision at the threshold may flip, and the test split must pass the same gates
at the same threshold. Then the version is tagged and the Triton repository written (two outputs: ``scores``,
``anomaly_map``); otherwise the challenger alias is removed and the step fails with the reasons.

With an INT8 file (``export.int8.enabled``, :mod:`pipelines.tasks.anomaly_int8`) it is checked the same way with its
own tolerances (:func:`check_anomaly_int8`): ``export.serve=int8`` serves it only when it holds; a refused INT8 model
is reported (``export/int8.json``, the ``defectops.int8_*`` tags) and FP32 served, without failing the step.
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
from defectops.pipelines.tasks.anomaly_int8 import int8_reasons, judge_at, onnx_scorer
from defectops.pipelines.tasks.anomaly_scoring import judge, score_split
from defectops.pipelines.tracking import publish_verified, record_export_verdict
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
    from defectops.serving.triton import write_repository

    crops = load_snapshot(ctx.path(RUN.crops))
    scorer = onnx_scorer(ctx.path(RUN.onnx))
    try:
        val = score_split(crops, "val", scorer, cfg)
        test = score_split(crops, "test", scorer, cfg)
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
    c, rid, version = record_export_verdict(ctx, registry, {
        T.ONNX_TOP1_AGREEMENT: f"{par['top1_agreement']:.6f}", T.ONNX_MAX_LOGIT_DIFF: f"{par['max_abs_diff']:.3e}",
        T.ONNX_GATES_PASSED: str(judged.scored.gates.passed).lower(), T.EXPORT_VERIFIED: str(not problems).lower()},
        problems, "exported anomaly model")
    int8 = None
    extra: dict[str, str] = {}
    if export.int8.enabled and ctx.path(RUN.onnx_int8).is_file():
        int8 = check_anomaly_int8(cfg, ctx, data.good_class, gates, champion)
        extra = {T.INT8_MAX_SCORE_REL_DIFF: f"{int8['parity']['max_rel_diff']:.3e}",
                 T.INT8_DECISION_FLIPS: str(int8["parity"]["decision_flips"])}
    served, precision = publish_verified(ctx, c, rid, registry, version, export.serve, int8, extra)
    h, w = (int(v) for v in task_input_hw(ctx))
    model_dir = write_repository(ctx.path(RUN.triton), registry.model_name, served, crops.classes,
                                 (3, h, w), export.triton, version=int(version))  # outputs from the ONNX file
    return VerifyExportResult(par, judged.scored.metrics.macro_recall, str(model_dir), precision,
                              {k: int8[k] for k in ("publish", "macro_recall", "macro_recall_drop", "top1_agreement",
                                                    "reasons")} | {"max_rel_diff": int8["parity"]["max_rel_diff"],
                                                                   "decision_flips": int8["parity"]["decision_flips"]}
                              if int8 else None)


def check_anomaly_int8(cfg: AnomalyConfig, ctx: StepContext, good_class: str, gates: GateConfig,
                       champion: ClassificationMetrics | None) -> dict[str, Any]:
    """Score val and test through ``RUN.onnx_int8``, compare with the checkpoint's scores (:func:`score_parity`) and
    judge test at the checkpoint's threshold and normalisation (:func:`pipelines.tasks.anomaly_int8.judge_at`); it
    holds without any :func:`pipelines.tasks.anomaly_int8.int8_reasons`. Writes and returns ``RUN.int8_report``."""
    crops = load_snapshot(ctx.path(RUN.crops))
    scorer = onnx_scorer(ctx.path(RUN.onnx_int8))
    val = score_split(crops, "val", scorer, cfg)
    test = score_split(crops, "test", scorer, cfg)
    pred = np.load(ctx.path(RUN.predictions))
    doc = read_json(ctx.path(RUN.anomaly))
    threshold = float(doc["threshold"]["value"])
    par = score_parity(np.concatenate([pred["val_scores"], pred["scores"]]), np.concatenate([val.scores, test.scores]),
                       threshold)
    scored = judge_at(test, crops, good_class, gates, doc["normalization"], champion)
    reasons = int8_reasons(par, [f"{g.name} ({g.detail})" for g in scored.gates.failed()], cfg)
    reference = ClassificationMetrics.from_dict(read_json(ctx.path(RUN.metrics)))
    out = {"publish": not reasons, "reasons": reasons, "parity": par, "threshold": threshold,
           "max_score_rel_diff": cfg.int8_max_score_rel_diff, "max_flip_rate": cfg.int8_max_flip_rate,
           "macro_recall": scored.metrics.macro_recall, "reference_macro_recall": reference.macro_recall,
           "macro_recall_drop": float(reference.macro_recall - scored.metrics.macro_recall),
           "top1_agreement": par["top1_agreement"], "metrics": scored.metrics_doc(), "gates": scored.gates.to_dict()}
    write_json(ctx.path(RUN.int8_report), out)
    return out


def task_input_hw(ctx: StepContext) -> tuple[int, int]:
    meta = read_json(ctx.path(RUN.crops) / "snapshot.json")
    h, w = meta["fit"]["size"]
    return int(h), int(w)
