"""Boxes from anomaly maps, and how well they find the annotated defects of board pairs (``task=anomaly`` on
DeepPCB-format data). Pure functions: arrays in, dataclasses out.

An anomaly model never sees a defect label, so its boxes carry one type-agnostic name (:data:`AGNOSTIC`). They are
scored by the DeepPCB rule (:mod:`evaluation.deeppcb`: a ground truth is found when a box reaches IoU > 0.33) with the
ground truths renamed to the same name, so the benchmark's precision, recall, F-score and mAP read as "is there a box
on each defect", whatever its type. IoU is unchanged by scaling either axis, so boxes and ground truths are compared
in map pixels.

A box's confidence is ``peak / (peak + threshold)``: its region's highest map value relative to the map threshold (0.5
at the threshold, towards 1 far above it), in [0, 1] as the result format expects and ranked like the peak.

The map threshold is chosen on validation (:func:`choose_map_threshold`: the F-score of box recall and box precision
over a grid of quantiles of the validation maps of defective images) and applied unchanged to test
(:func:`score_map_boxes`). Intervals are Wilson intervals over boxes (recall: over ground truths; precision: over
boxes), which treats the boxes of one board as independent: narrower than a board-level bootstrap would give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from defectops.evaluation.deeppcb import IOU_THRESHOLD, Detection, GroundTruth, boxes_found, deeppcb_iou, score
from defectops.evaluation.intervals import Interval, wilson_interval

__all__ = ["AGNOSTIC", "BoxScore", "MapThreshold", "anomaly_boxes", "choose_map_threshold", "map_detections",
           "score_map_boxes"]

AGNOSTIC = "defect"
QUANTILES = tuple(float(1 - q) for q in np.geomspace(0.5, 1e-4, 48))  # from the median to the top 0.01 %

Corners = tuple[float, float, float, float]


def anomaly_boxes(amap: np.ndarray, threshold: float, *, min_area: int = 4,
                  scale: tuple[float, float] = (1.0, 1.0)) -> list[tuple[float, float, float, float, float]]:
    """Boxes of the connected regions of ``amap`` (H x W) at or above ``threshold``: ``(x1, y1, x2, y2, peak)``,
    corners in map pixels times ``scale`` (x, y), highest peak first; regions under ``min_area`` pixels are dropped."""
    import cv2

    a = np.asarray(amap)
    mask = (a >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes = []
    sx, sy = scale
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            continue
        peak = float(a[labels == k].max())
        boxes.append((x * sx, y * sy, (x + w) * sx, (y + h) * sy, peak))
    return sorted(boxes, key=lambda b: -b[4])


def map_detections(amap: np.ndarray, threshold: float, *, min_area: int = 4,
                   scale: tuple[float, float] = (1.0, 1.0)) -> list[Detection]:
    """:func:`anomaly_boxes` as type-agnostic DeepPCB detections (confidence ``peak / (peak + threshold)``)."""
    out = []
    for x1, y1, x2, y2, peak in anomaly_boxes(amap, threshold, min_area=min_area, scale=scale):
        conf = peak / (peak + threshold) if threshold > 0 and peak + threshold > 0 else 1.0
        out.append(Detection(x1, y1, x2, y2, float(min(max(conf, 0.0), 1.0)), AGNOSTIC))
    return out


@dataclass(frozen=True)
class BoxScore:
    """Boxes from maps at one threshold against the annotated defects.

    ``found`` ground truths have a box at IoU > ``iou``; ``covered`` boxes overlap some ground truth that much;
    ``deeppcb`` is the benchmark's score (type-agnostic names); ``boxes_on_good`` counts boxes drawn on good images
    (defect-free boards), the box-level false calls a line would see.
    """

    threshold: float
    min_area: int
    iou: float
    n_images: int
    n_gt: int
    n_boxes: int
    found: int
    covered: int
    recall: Interval
    precision: Interval
    fscore: float
    deeppcb: dict[str, Any]
    good_images: int
    boxes_on_good: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall"], d["precision"] = self.recall.to_dict(), self.precision.to_dict()
        return d


def _f(found: int, n_gt: int, covered: int, n_boxes: int) -> float:
    r = found / n_gt if n_gt else 0.0
    p = covered / n_boxes if n_boxes else 0.0
    return 2 * r * p / (r + p) if r + p > 0 else 0.0


def _counts(maps: Sequence[np.ndarray], gts: Sequence[Sequence[Corners]], threshold: float, min_area: int,
            iou: float) -> tuple[int, int, int, int, list[list[Detection]]]:
    found = covered = n_boxes = n_gt = 0
    dets_all = []
    for amap, g in zip(maps, gts, strict=True):
        dets = map_detections(amap, threshold, min_area=min_area)
        truths = [GroundTruth(*b, AGNOSTIC) for b in g]
        found += sum(boxes_found(truths, [d.box for d in dets], iou))
        covered += sum(any(deeppcb_iou(t, d) > iou for t in truths) for d in dets)
        n_boxes += len(dets)
        n_gt += len(truths)
        dets_all.append(dets)
    return found, n_gt, covered, n_boxes, dets_all


def score_map_boxes(maps: Sequence[np.ndarray], gts: Sequence[Sequence[Corners]], threshold: float, *,
                    min_area: int = 4, iou: float = IOU_THRESHOLD, good_maps: Sequence[np.ndarray] = (),
                    confidence: float = 0.95) -> BoxScore:
    """Boxes of ``maps`` (one H x W map per image) at ``threshold`` against ``gts`` (per image, ground-truth corners in
    map pixels); ``good_maps`` are maps of good images, where every box is a false call."""
    if len(maps) != len(gts):
        raise ValueError(f"{len(maps)} maps but {len(gts)} ground-truth lists: one per image")
    found, n_gt, covered, n_boxes, dets = _counts(maps, gts, threshold, min_area, iou)
    benchmark = score({str(i): ([GroundTruth(*b, AGNOSTIC) for b in g], d)
                       for i, (g, d) in enumerate(zip(gts, dets, strict=True))}, iou)
    on_good = sum(len(anomaly_boxes(m, threshold, min_area=min_area)) for m in good_maps)
    return BoxScore(float(threshold), int(min_area), float(iou), len(maps), n_gt, n_boxes, found, covered,
                    wilson_interval(found, n_gt, confidence, unit="defects"),
                    wilson_interval(covered, n_boxes, confidence, unit="boxes"),
                    _f(found, n_gt, covered, n_boxes), benchmark.to_dict(), len(good_maps), on_good)


@dataclass(frozen=True)
class MapThreshold:
    """The map threshold chosen on validation and the box F-score, recall and precision it reached there."""

    value: float
    fscore: float
    recall: float
    precision: float
    candidates: int
    rule: str = "max box F-score (IoU > 0.33) over quantiles of the val maps of defective images"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_map_threshold(maps: Sequence[np.ndarray], gts: Sequence[Sequence[Corners]], *, min_area: int = 4,
                         iou: float = IOU_THRESHOLD, quantiles: Sequence[float] = QUANTILES) -> MapThreshold:
    """The threshold (among ``quantiles`` of the pixels of ``maps``) whose boxes reach the highest F-score of box
    recall and box precision against ``gts``; ties go to the lower threshold (more recall). ValueError when there is
    no map or no ground truth to choose on."""
    if not len(maps) or not sum(len(g) for g in gts):
        raise ValueError("no annotated defect in the validation maps: the map threshold cannot be chosen")
    pixels = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    candidates = sorted({float(v) for v in np.quantile(pixels, list(quantiles))})
    best: MapThreshold | None = None
    for t in candidates:
        found, n_gt, covered, n_boxes, _ = _counts(maps, gts, t, min_area, iou)
        f = _f(found, n_gt, covered, n_boxes)
        if best is None or f > best.fscore:
            best = MapThreshold(t, f, found / n_gt, covered / n_boxes if n_boxes else 0.0, len(candidates))
    assert best is not None
    return best
