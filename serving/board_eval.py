"""Board-level evaluation of a crop classifier: detect on the val and test boards, choose the score thresholds on val,
score test with the DeepPCB metric (mAP and F-score at IoU > ``detect.iou_threshold``), with bootstrap intervals over
boards and scores per board design.

Why here: the evaluate step (PyTorch), verify_export (ONNX) and the INT8 check all score the same boards the same way;
only the logits function differs. Nothing here reads the run root: the caller loads the boards (:func:`board_split`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectops.evaluation.deeppcb import GroundTruth, boxes_found, score
from defectops.evaluation.intervals import board_breakdown
from defectops.serving.config import DetectConfig
from defectops.serving.detector import (
    CONFIDENCES,
    SELECT_OBJECTIVES,
    THRESHOLD_GRID,
    BoardDetector,
    DetectorSettings,
    detections_from_probs,
    select_thresholds,
)
from defectops.training.candidates import detection_box
from defectops.training.config import CandidateConfig
from defectops.training.crops import candidate_params
from defectops.training.snapshot import Snapshot, sample_group

LogitsFn = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(n)


@dataclass(frozen=True)
class BoardSplit:
    """The accepted board pairs of one split, keyed by image stem: (stem, template, tested), ground truth, design."""

    pairs: list[tuple[str, Path, Path]]
    truths: dict[str, list[GroundTruth]]
    groups: dict[str, str]


def board_split(snap: Snapshot, quarantined: set[int], split: str) -> BoardSplit:
    """The board pairs of ``split`` that validation accepted (``quarantined``: manifest indices it set aside)."""
    pairs, truths, groups = [], {}, {}
    for i, s in enumerate(snap.samples):
        if s["split"] != split or i in quarantined or "template" not in s:
            continue
        key = Path(s["path"]).name.removesuffix("_test.jpg")
        pairs.append((key, snap.file(s["template"]), snap.file(s["path"])))
        truths[key] = [GroundTruth(b[0], b[1], b[2], b[3], b[4]) for b in s.get("boxes", [])]
        groups[key] = sample_group(s)
    return BoardSplit(pairs, truths, groups)


def detector_settings(classes: tuple[str, ...], good_class: str, candidates: CandidateConfig, detect: DetectConfig,
                      threshold: float = 0.5) -> DetectorSettings:
    """The detector a run's candidate and detection configs stand for."""
    c = candidates
    return DetectorSettings(classes=classes, good_class=good_class, crop_size=c.crop_size, context=c.context,
                            candidates=candidate_params(c), score_threshold=threshold, box_margin=c.box_margin,
                            merge=detect.merge, confidence=detect.confidence)


def board_evaluation(boards: Mapping[str, BoardSplit], settings: DetectorSettings, detect: DetectConfig,
                     logits_fn: LogitsFn, threshold: float | None, *, confidence: float = 0.95,
                     type_thresholds: Mapping[str, float] | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Detect on the ``val`` and ``test`` boards; choose the score threshold (and with ``detect.threshold_per_type``
    one per defect type) on val, unless given; score each split. Each split also gets bootstrap intervals over boards
    (``intervals``) and its scores per board design (``per_group``, ``worst_group``). ValueError for an unknown
    ``detect.select`` or ``detect.confidence``."""
    if detect.select not in SELECT_OBJECTIVES:
        raise ValueError(f"detect.select={detect.select} is unknown: use {', '.join(SELECT_OBJECTIVES)}")
    if detect.confidence not in CONFIDENCES:
        raise ValueError(f"detect.confidence={detect.confidence} is unknown: use {', '.join(CONFIDENCES)}")
    detector = BoardDetector(logits_fn, settings, threads=detect.threads, batch_boards=detect.batch_boards)
    out: dict[str, Any] = {"settings": {"candidates": settings.candidates, "box_margin": settings.box_margin,
                                        "crop_size": settings.crop_size, "context": settings.context,
                                        "merge": settings.merge, "confidence": settings.confidence}}
    runs = {}
    groups: dict[str, str] = {}
    for split in ("val", "test"):
        b = boards[split]
        groups |= b.groups
        advance = progress(f"detecting on {split} boards", len(b.pairs)) if progress else (lambda n: None)
        t0 = time.perf_counter()
        results = []
        for r in detector.run(b.pairs):
            results.append(r)
            advance(1)
        runs[split] = (results, b.truths, len(b.pairs) / max(time.perf_counter() - t0, 1e-9))

    def images_at(split: str, t: float, per_type: Mapping[str, float]) -> dict[str, Any]:
        results, gts, _ = runs[split]
        return {r.key: (gts[r.key], detections_from_probs(r.candidates, r.probs, settings, r.shape, t, per_type))
                for r in results}

    per_type_thresholds = dict(type_thresholds or {})
    if threshold is None and not runs["val"][0]:
        threshold = 0.5
    elif threshold is None:  # best val objective on a grid (serving.detector.select_thresholds)
        objective = SELECT_OBJECTIVES[detect.select]
        threshold, per_type_thresholds = select_thresholds(
            lambda t, per: objective(score(images_at("val", t, per), iou_threshold=detect.iou_threshold)),
            [c for c in settings.classes if c != settings.good_class],
            grid=THRESHOLD_GRID, per_type=detect.threshold_per_type)
    for split in ("val", "test"):
        results, gts, ips = runs[split]
        if results:
            found = [f for r in results for f in boxes_found(
                gts[r.key], [detection_box(c, settings.box_margin, r.shape) for c in r.candidates],
                detect.iou_threshold)]
            images = images_at(split, threshold, per_type_thresholds)
            out[split] = {**score(images, iou_threshold=detect.iou_threshold).to_dict(), "images_per_s": ips,
                          "boards": len(results), "ceiling_recall": float(np.mean(found)) if found else None,
                          **board_breakdown(images, groups, iou_threshold=detect.iou_threshold,
                                            confidence=confidence)}
    out["score_threshold"] = threshold
    out["type_thresholds"] = per_type_thresholds
    return out
