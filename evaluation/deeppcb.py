"""The DeepPCB benchmark metric: mAP and F-score of board-level detections at IoU > 0.33.

What: the published DeepPCB protocol (``DATASET.md`` beside the data) as pure functions: per image, ground truths in
file order are matched against detections in descending-confidence order; a pair is taken when both are still free
and IoU > 0.33, whatever the class, and it is *correct* when the names agree. Precision is correct / all submitted
detections, recall is correct / all ground truths, the F-score is their harmonic mean, and "mAP" is the average
precision of all detections of all images ranked by confidence. Plus the result-file format
(``x1,y1,x2,y2,confidence,name`` per line), and ceilings of a candidate step under a perfect classifier.

Why: DefectOps reports its board-level detector on DeepPCB next to the published reference (98.6% mAP, 98.2% F-score),
so the numbers must be computed exactly as the benchmark computes them, by pure functions (no I/O) that the
benchmarks, the pipeline and the tests share.

Followed: the benchmark's own evaluation script, ``evaluation/script.py`` + ``rrc_evaluation_funcs.py`` of
tangsanli5201/DeepPCB, an ICDAR 2015 (Robust Reading) script with small changes, as mirrored in
Charmve/Surface-Defect-Detection ``DeepPCB/evaluation/`` (commit 8814c16):

- IoU (``get_intersection_over_union``): each box becomes a polygon with corners (x1, y1) and (x2, y2) whose area the
  Polygon library computes, i.e. continuous coordinates: area = (x2 - x1) * (y2 - y1), *no* +1 (unlike
  :func:`training.candidates.iou`, which counts inclusive pixels). A zero division (two empty boxes) gives 0.
- matching (``evaluate_method``): detections are sorted by descending confidence when they are read
  (``get_tl_line_values_from_file_contents``); then ``for gt in order: for det in order: if both free and IoU >
  IOU_CONSTRAINT (0.33): pair``, so each ground truth takes the first free detection above the threshold, not the
  best one, and a wrong-class detection can take a ground truth. ``correct`` compares the upper-cased names.
- P, R, F (``methodPrecision``, ``methodRecall``, ``methodHmean``): pooled counts over all images, not averages of
  per-image values; each is 0 when its denominator is 0.
- "mAP" (``compute_ap`` on ``arrGlobalConfidences``/``arrGlobalMatches``): *one* non-interpolated AP over all
  detections of all classes, ranked by confidence: sum over correct detections of (correct so far / rank), divided by
  the number of ground truths. It is not a mean of per-class APs; :attr:`DeepPCBScore.per_class_ap` (the same
  formula within each predicted class) is extra information and does not enter ``map``.

Where the script and ``DATASET.md`` differ, or the script is silent, this module follows ``DATASET.md``:

- order: the script re-sorts detections with ``np.argsort`` (unstable for more than 16 items); here the sort is
  stable, so equal confidences keep the given order (the file order, as ``DATASET.md`` says). For the global AP,
  images are visited in sorted key order and ties keep that order.
- boxes: the script's default ``LTRB: False`` expects 8-point quadrilaterals, but the published result format is
  ``x1,y1,x2,y2,confidence,name`` (``LTRB: True``), which is what is implemented.
- names: compared case-insensitively like the script; its trimming of punctuation at the ends of a ground-truth name
  and its ``###`` don't-care boxes come from text recognition and do not apply to the six DeepPCB names.
- images: the script iterates over ground-truth files and rejects result files without one; here an image may have
  no ground truth, and its detections count as false positives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from defectops.evaluation.metrics import nan_to_none

IOU_THRESHOLD = 0.33


class _HasBox(Protocol):
    @property
    def x1(self) -> float: ...
    @property
    def y1(self) -> float: ...
    @property
    def x2(self) -> float: ...
    @property
    def y2(self) -> float: ...


BoxLike = _HasBox | Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Detection:
    """One detected defect: corners (x1, y1)-(x2, y2), a confidence in [0, 1] and a DeepPCB name."""

    x1: float
    y1: float
    x2: float
    y2: float
    confidence: float
    label: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x1, self.y1, self.x2, self.y2


@dataclass(frozen=True)
class GroundTruth:
    """One annotated defect: corners (x1, y1)-(x2, y2) and a DeepPCB name."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x1, self.y1, self.x2, self.y2


@dataclass(frozen=True)
class Match:
    """Outcome for one detection: the index of the ground truth it took (``None``: a false positive) and whether the
    names agree (only then does it count as a true positive)."""

    gt: int | None
    correct: bool


@dataclass(frozen=True)
class DeepPCBScore:
    """The benchmark's numbers over a set of images.

    ``map`` is the benchmark's single AP over all detections; ``per_class_ap`` applies the same formula to the
    detections of each predicted class against the ground truths of that class (``NaN`` for a class without ground
    truth). ``per_class_recall`` is correct / ground truths of the class (``NaN`` without ground truth).
    ``n_correct`` pairs have agreeing names; ``n_matched`` counts all pairs (localised, whatever the class).
    """

    map: float
    precision: float
    recall: float
    fscore: float
    n_images: int
    n_gt: int
    n_det: int
    n_correct: int
    per_class_ap: dict[str, float]
    per_class_recall: dict[str, float]
    n_matched: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: plain str/int/float/dict, ``NaN`` written as ``None``."""
        return {
            "map": nan_to_none(self.map),
            "precision": nan_to_none(self.precision),
            "recall": nan_to_none(self.recall),
            "fscore": nan_to_none(self.fscore),
            "n_images": int(self.n_images),
            "n_gt": int(self.n_gt),
            "n_det": int(self.n_det),
            "n_correct": int(self.n_correct),
            "n_matched": int(self.n_matched),
            "per_class_ap": {c: nan_to_none(v) for c, v in self.per_class_ap.items()},
            "per_class_recall": {c: nan_to_none(v) for c, v in self.per_class_recall.items()},
        }


def _coords(b: BoxLike) -> tuple[float, float, float, float]:
    if isinstance(b, Sequence | np.ndarray):
        if len(b) < 4:
            raise ValueError(f"a box needs 4 coordinates (x1, y1, x2, y2), got {b!r}")
        return float(b[0]), float(b[1]), float(b[2]), float(b[3])
    return float(b.x1), float(b.y1), float(b.x2), float(b.y2)


def deeppcb_iou(a: BoxLike, b: BoxLike) -> float:
    """IoU of two boxes in continuous coordinates, as the benchmark's script computes it: area = (x2 - x1) * (y2 - y1),
    no +1 for inclusive pixels. Boxes are (x1, y1, x2, y2) sequences or objects with those attributes."""
    ax1, ay1, ax2, ay2 = _coords(a)
    bx1, by1, bx2, by2 = _coords(b)
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0) + max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0) - inter
    return inter / union if union > 0 else 0.0


def _names_agree(gt: str, det: str) -> bool:
    return gt.upper() == det.upper()


def _confidence_order(dets: Sequence[Detection]) -> list[int]:
    """Indices of ``dets`` by descending confidence; ties keep the given order."""
    for d in dets:
        if not math.isfinite(d.confidence):
            raise ValueError(f"detection confidence must be finite, got {d.confidence!r} in {d}")
    return sorted(range(len(dets)), key=lambda i: -dets[i].confidence)


def match_image(
    gts: Sequence[GroundTruth], dets: Sequence[Detection], iou_threshold: float = IOU_THRESHOLD
) -> list[Match]:
    """The benchmark's matching on one image; one :class:`Match` per detection, in the order of ``dets``.

    Detections are ranked by descending confidence (stable). For each ground truth in order, the first free detection
    in that ranking with IoU > ``iou_threshold`` is paired with it, whatever its class; the pair is correct when the
    names agree (case-insensitive). Unpaired detections are false positives (``gt=None``).
    """
    order = _confidence_order(dets)
    taken: dict[int, Match] = {}
    for gi, g in enumerate(gts):
        for di in order:
            if di not in taken and deeppcb_iou(g, dets[di]) > iou_threshold:
                taken[di] = Match(gi, _names_agree(g.label, dets[di].label))
                break
    return [taken.get(i, Match(None, False)) for i in range(len(dets))]


def _average_precision(confidences: Sequence[float], correct: Sequence[bool], n_gt: int) -> float:
    """The script's ``compute_ap``: rank by descending confidence (stable), sum correct-so-far / rank over correct
    detections, divide by ``n_gt`` (left undivided when ``n_gt`` is 0, where the sum is 0 anyway)."""
    if not confidences:
        return 0.0
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    hits = np.asarray(correct, dtype=bool)[order]
    ranks = np.flatnonzero(hits) + 1
    total = float((np.arange(1, ranks.size + 1) / ranks).sum())
    return total / n_gt if n_gt > 0 else total


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else 0.0


def score(
    images: Mapping[str, tuple[Sequence[GroundTruth], Sequence[Detection]]], iou_threshold: float = IOU_THRESHOLD
) -> DeepPCBScore:
    """The benchmark's mAP, precision, recall and F-score over ``images`` (key -> (ground truths, detections))."""
    confidences: list[float] = []
    correct: list[bool] = []
    labels: list[str] = []
    gt_per_class: dict[str, int] = {}
    correct_per_class: dict[str, int] = {}
    n_gt = n_det = n_correct = n_matched = 0
    for key in sorted(images):
        gts, dets = images[key]
        matches = match_image(gts, dets, iou_threshold)
        for i in _confidence_order(dets):
            confidences.append(float(dets[i].confidence))
            correct.append(matches[i].correct)
            labels.append(dets[i].label)
        for g in gts:
            gt_per_class[g.label] = gt_per_class.get(g.label, 0) + 1
        for m in matches:
            if m.gt is not None:
                n_matched += 1
                if m.correct:
                    name = gts[m.gt].label
                    correct_per_class[name] = correct_per_class.get(name, 0) + 1
                    n_correct += 1
        n_gt += len(gts)
        n_det += len(dets)
    precision, recall = _ratio(n_correct, n_det), _ratio(n_correct, n_gt)
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    per_class_ap: dict[str, float] = {}
    per_class_recall: dict[str, float] = {}
    for name in sorted(set(gt_per_class) | set(labels)):
        k = gt_per_class.get(name, 0)
        mine = [i for i, lab in enumerate(labels) if lab == name]
        per_class_ap[name] = (
            _average_precision([confidences[i] for i in mine], [correct[i] for i in mine], k) if k else math.nan
        )
        per_class_recall[name] = correct_per_class.get(name, 0) / k if k else math.nan
    return DeepPCBScore(
        map=_average_precision(confidences, correct, n_gt),
        precision=precision,
        recall=recall,
        fscore=fscore,
        n_images=len(images),
        n_gt=n_gt,
        n_det=n_det,
        n_correct=n_correct,
        per_class_ap=per_class_ap,
        per_class_recall=per_class_recall,
        n_matched=n_matched,
    )


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def format_result_lines(dets: Sequence[Detection]) -> str:
    """One image's result file: ``x1,y1,x2,y2,confidence,name`` lines by descending confidence (stable), coordinates
    rounded to integers (the script's format accepts only integers), each line ending in a newline.

    The confidence is written in the shortest positional form that reads back exactly (never an exponent, which the
    script's ``[0-1].?[0-9]*`` would reject). ValueError for a confidence outside [0, 1] or not finite, a name that is
    empty or holds a comma or whitespace, or a box with x2 < x1, y2 < y1 or a negative x2/y2 after rounding.
    """
    lines: list[str] = []
    for i in _confidence_order(dets):
        d = dets[i]
        if not 0.0 <= d.confidence <= 1.0:
            raise ValueError(f"confidence must lie in [0, 1] for the DeepPCB format, got {d.confidence!r} in {d}")
        if not d.label or any(ch == "," or ch.isspace() for ch in d.label):
            raise ValueError(f"name must be non-empty without commas or whitespace, got {d.label!r}")
        x1, y1, x2, y2 = (_round_half_up(v) for v in d.box)
        if x2 < x1 or y2 < y1 or x2 < 0 or y2 < 0:
            raise ValueError(f"invalid box ({x1}, {y1}, {x2}, {y2}) after rounding {d}")
        conf = np.format_float_positional(float(d.confidence), unique=True, trim="-")
        lines.append(f"{x1},{y1},{x2},{y2},{conf},{d.label}\n")
    return "".join(lines)


def parse_result_file(text: str) -> list[Detection]:
    """Detections of one result file, in file order; blank lines are skipped, ``\\r`` is ignored.

    ValueError names the line number for a line that is not ``x1,y1,x2,y2,confidence,name`` with numeric fields.
    """
    out: list[Detection] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.replace("\r", "").strip()
        if not line:
            continue
        parts = line.split(",", 5)
        if len(parts) != 6:
            raise ValueError(f"line {number}: expected 'x1,y1,x2,y2,confidence,name', got {line!r}")
        try:
            x1, y1, x2, y2, conf = (float(p) for p in parts[:5])
        except ValueError as exc:
            raise ValueError(f"line {number}: non-numeric coordinate or confidence in {line!r}") from exc
        name = parts[5].strip()
        if not name:
            raise ValueError(f"line {number}: empty name in {line!r}")
        out.append(Detection(x1, y1, x2, y2, conf, name))
    return out


# -- ceilings of a candidate step -------------------------------------------------------------------------------------


def boxes_found(
    gts: Sequence[GroundTruth], boxes: Iterable[BoxLike], iou_threshold: float = IOU_THRESHOLD
) -> list[bool]:
    """Per ground truth: does any box reach IoU > ``iou_threshold`` with it? ``mean`` is the recall ceiling of a
    candidate step at the benchmark's threshold (what no classifier can exceed)."""
    bs = [_coords(b) for b in boxes]
    return [any(deeppcb_iou(g, b) > iou_threshold for b in bs) for g in gts]


def oracle_detections(
    gts: Sequence[GroundTruth], boxes: Iterable[BoxLike], iou_threshold: float = IOU_THRESHOLD
) -> list[Detection]:
    """What a perfect classifier would report for candidate ``boxes``: each box whose best ground truth (highest IoU,
    earlier on ties) exceeds ``iou_threshold`` becomes a detection of that ground truth's class with confidence = that
    IoU (so of two duplicates the better-placed ranks first); the rest are false calls and dropped.

    :func:`score` of these gives the benchmark's ceiling for the candidates under the matching rule: a ground truth
    found by two boxes yields one true and one false positive.
    """
    out: list[Detection] = []
    for b in boxes:
        x1, y1, x2, y2 = _coords(b)
        best, best_iou = -1, iou_threshold
        for gi, g in enumerate(gts):
            v = deeppcb_iou(g, (x1, y1, x2, y2))
            if v > best_iou:
                best, best_iou = gi, v
        if best >= 0:
            out.append(Detection(x1, y1, x2, y2, best_iou, gts[best].label))
    return out
