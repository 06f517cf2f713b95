"""INT8 for an anomaly model (PatchCore), where it holds: the backbone quantized, the nearest-neighbour part in FP32.

What: :func:`export_anomaly_int8` (the export step, ``export.int8.enabled``) quantizes the FP32 ONNX export with
onnxruntime's static quantization (QDQ, :func:`serving.quantize.quantize_int8`) restricted to the backbone: the
``Conv``, ``Clip`` (ReLU6) and ``Add`` (residual) nodes of its stages from ``blocks.2`` on. Everything after the
feature extractor (the 3 x 3 feature pooling, the multi-scale embedding, the distances to the memory bank, their
minimum, the re-weighting, the map's Gaussian blur, itself a ``Conv``) stays FP32, and so do the stem and the first
two stages (full-resolution layers: keeping them FP32 halved the score error on KolektorSDD at the same speed). The
activation ranges are calibrated on up to ``export.int8.calibration_samples`` good train images (a seeded sample:
the images the memory bank was built from). verify_export
(:func:`pipelines.tasks.anomaly_verify.check_anomaly_int8`) scores val and test through the INT8 file; it holds when
every image score is within ``anomaly.int8_max_score_rel_diff`` of the checkpoint's (relative), at most
``anomaly.int8_max_flip_rate`` of the val + test decisions at the checkpoint's threshold change
(:func:`int8_reasons`), and the test split passes the same gates at the checkpoint's threshold and normalisation.

Why: quantizing the whole graph (the classifiers' recipe) collapsed every image score of the tiny test model to
20.0 (FP32 45-52): the distance and minimum part cannot take INT8 ranges. The backbone can; a score that drifts is
still refused, and an INT8 refusal never fails the step (FP32 is served, as for classifiers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core.layout import RUN
from defectops.evaluation.gates import GateConfig
from defectops.evaluation.metrics import ClassificationMetrics
from defectops.pipelines.context import StepContext
from defectops.pipelines.tasks.anomaly_scoring import OUTPUTS, Scorer, Scores, logits_at
from defectops.serving.config import ExportConfig
from defectops.training.config import AnomalyConfig
from defectops.training.snapshot import Snapshot, load_snapshot, resampling_units

INT8_OP_TYPES = ("Conv", "Clip", "Add")
# ONNX node names of the timm backbone's stages inside anomalib's TimmFeatureExtractor: blocks.2 and later (strides 8
# to 32) are quantized; the stem, blocks.0 and blocks.1 (strides 2 and 4) stay FP32 (docs/anomaly.md: measured).
INT8_STAGE = re.compile(r"/feature_extractor/feature_extractor/blocks\.(\d+)/")
FIRST_INT8_BLOCK = 2


def fp32_nodes(onnx_path: Path) -> list[str]:
    """Names of the nodes of ``onnx_path`` that stay FP32 in the INT8 model: all but the backbone's stages from
    ``blocks.2`` on (the nearest-neighbour part, the pooling and embedding, the map's blur, the stem, blocks 0-1)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node
            if not ((m := INT8_STAGE.search(n.name)) and int(m.group(1)) >= FIRST_INT8_BLOCK)]


def export_anomaly_int8(ctx: StepContext, export: ExportConfig, good_class: str) -> dict[str, Any]:
    """Write ``RUN.onnx_int8``: the backbone of ``RUN.onnx`` quantized, calibrated on a seeded sample of the good train
    images; returns the file and its calibration (the ``int8`` of :class:`ExportResult`)."""
    from defectops.serving.quantize import calibration_sample, quantize_int8
    from defectops.training.data import load_split, to_tensor

    q = export.int8
    crops = load_snapshot(ctx.path(RUN.crops))
    x, y, _ = load_split(crops, "train")
    good = x[y == crops.classes.index(good_class)]
    idx = calibration_sample(np.zeros(len(good), np.int64), q.calibration_samples, seed=0)
    calibration = {"samples": len(idx), "images": "good train", "method": str(q.method),
                   "per_channel": q.per_channel, "op_types": list(INT8_OP_TYPES),
                   "scope": f"backbone blocks.{FIRST_INT8_BLOCK}+"}
    quantize_int8(ctx.path(RUN.onnx), ctx.path(RUN.onnx_int8), to_tensor(good[idx]).numpy(),
                  per_channel=q.per_channel, method=str(q.method), batch_size=8, op_types=INT8_OP_TYPES,
                  exclude_nodes=fp32_nodes(ctx.path(RUN.onnx)),
                  extra_metadata={"defectops.precision": "int8",
                                  "defectops.int8_calibration": json.dumps(calibration)})
    ctx.reporter.log(f"INT8 backbone calibrated on {len(idx)} good train images ({q.method})")
    return {"path": str(ctx.path(RUN.onnx_int8)), "bytes": ctx.path(RUN.onnx_int8).stat().st_size, **calibration}


def onnx_scorer(path: Path, threads: int = 0) -> Scorer:
    """Image scores and maps of uint8 images through the ONNX file ``path`` (onnxruntime, CPU)."""
    from defectops.serving.onnx_export import onnx_session
    from defectops.training.data import to_tensor

    session = onnx_session(path, threads)

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = session.run(list(OUTPUTS), {"images": to_tensor(images).numpy()})
        return np.asarray(scores).reshape(-1), np.asarray(maps)

    return score


def judge_at(test: Scores, crops: Snapshot, good_class: str, gates: GateConfig, normalization: dict[str, Any],
             champion: ClassificationMetrics | None) -> Any:
    """The test split judged at a fixed operating point (the checkpoint's threshold and normalisation), not one chosen
    again on the candidate's own val scores: an :class:`evaluation.scoring.Scored`."""
    from defectops.evaluation.anomaly import ScoreNormalization
    from defectops.evaluation.scoring import score_crops

    logits = logits_at(test.scores, ScoreNormalization.from_dict(normalization), crops.classes, good_class)
    return score_crops(logits, test.labels, crops.classes, good_class, resampling_units(crops, test.paths), gates,
                       champion=champion)


def int8_reasons(parity: dict[str, Any], failed_gates: list[str], cfg: AnomalyConfig) -> list[str]:
    """Pure: why an INT8 anomaly model does not hold (empty: it holds)."""
    reasons = [f"gate {g} failed" for g in failed_gates]
    if not np.isfinite(parity["max_rel_diff"]) or parity["max_rel_diff"] > cfg.int8_max_score_rel_diff:
        reasons.append(f"image scores differ from the checkpoint's by up to {parity['max_rel_diff']:.2e} (relative) > "
                       f"anomaly.int8_max_score_rel_diff {cfg.int8_max_score_rel_diff}")
    if parity["decision_flips"] > cfg.int8_max_flip_rate * parity["n"]:
        reasons.append(f"{parity['decision_flips']} of {parity['n']} decisions at the threshold differ from the "
                       f"checkpoint's: more than anomaly.int8_max_flip_rate {cfg.int8_max_flip_rate}")
    return reasons
