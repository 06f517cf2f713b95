"""Pure parts of the board detector: probabilities -> detections, and merging fragments of one defect."""

from __future__ import annotations

import numpy as np
import pytest

from defectops.evaluation.deeppcb import Detection
from defectops.serving.detector import DetectorSettings, detections_from_probs, merge_fragments, select_thresholds
from defectops.training.candidates import Candidate

CLASSES = ("false_call", "open", "short")


def _settings(**kw: object) -> DetectorSettings:
    return DetectorSettings(classes=CLASSES, good_class="false_call", crop_size=32, context=2.0, **kw)  # type: ignore[arg-type]


def test_threshold_label_and_box() -> None:
    cands = [Candidate(10, 10, 20, 20, 30), Candidate(100, 100, 110, 110, 30), Candidate(0, 0, 5, 5, 10)]
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.15, 0.05], [0.45, 0.5, 0.05]])
    dets = detections_from_probs(cands, probs, _settings(box_margin=6), (640, 640), threshold=0.5)
    # detected on 1 - p(good) >= 0.5; the confidence is the reported type's probability by default
    assert [(d.label, round(d.confidence, 3)) for d in dets] == [("short", 0.7), ("open", 0.5)]
    assert (dets[0].x1, dets[0].y1, dets[0].x2, dets[0].y2) == (4, 4, 26, 26)
    assert (dets[1].x1, dets[1].y1) == (0, 0)  # clipped at the border
    assert detections_from_probs([], np.zeros((0, 3)), _settings(), (64, 64)) == []
    defect = detections_from_probs(cands, probs, _settings(box_margin=6, confidence="defect"), (640, 640), 0.5)
    assert [(d.label, round(d.confidence, 3)) for d in defect] == [("short", 0.9), ("open", 0.55)]


def test_label_confidence_ranks_type_ambiguous_detections_last() -> None:
    cands = [Candidate(10, 10, 20, 20, 30), Candidate(100, 100, 110, 110, 30)]
    probs = np.array([[0.02, 0.50, 0.48], [0.10, 0.85, 0.05]])  # the first is surely a defect, but which?
    dets = detections_from_probs(cands, probs, _settings(), (640, 640), threshold=0.5)
    assert [(d.x1, d.label) for d in dets] == [(94, "open"), (4, "open")]
    defect = detections_from_probs(cands, probs, _settings(confidence="defect"), (640, 640), threshold=0.5)
    assert [d.x1 for d in defect] == [4, 94]
    with pytest.raises(ValueError, match="detect.confidence"):
        detections_from_probs(cands, probs, _settings(confidence="max"), (640, 640))


def test_merge_fragments_of_one_defect_only() -> None:
    a = Detection(10, 10, 20, 20, 0.9, "open")
    b = Detection(18, 12, 30, 22, 0.8, "open")      # overlaps a, same type: merged
    c = Detection(25, 15, 35, 25, 0.7, "short")     # overlaps b but another type: kept
    d = Detection(100, 100, 110, 110, 0.6, "open")  # far away: kept
    merged = merge_fragments([d, c, b, a])
    assert Detection(10, 10, 30, 22, 0.9, "open") in merged
    assert c in merged
    assert d in merged
    assert len(merged) == 3


def test_type_thresholds_apply_to_the_reported_type() -> None:
    cands = [Candidate(10, 10, 20, 20, 30), Candidate(100, 100, 110, 110, 30)]
    probs = np.array([[0.4, 0.5, 0.1], [0.4, 0.1, 0.5]])  # both 0.6 defect probability: an open, a short
    both = detections_from_probs(cands, probs, _settings(), (640, 640), threshold=0.5)
    assert sorted(d.label for d in both) == ["open", "short"]
    strict_short = detections_from_probs(cands, probs, _settings(), (640, 640), 0.5, {"short": 0.7})
    assert [d.label for d in strict_short] == ["open"]
    from_settings = detections_from_probs(cands, probs, _settings(type_thresholds={"open": 0.65}), (640, 640), 0.5)
    assert [d.label for d in from_settings] == ["short"]


def test_select_thresholds_common_then_per_type() -> None:
    grid = [round(0.1 * i, 1) for i in range(1, 10)]
    best = {"open": 0.3, "short": 0.7}  # a separable objective whose best per-type thresholds are known

    def objective(t: float, per: dict[str, float]) -> float:
        return -sum(abs(per.get(ty, t) - b) for ty, b in best.items())

    common, none = select_thresholds(objective, ["open", "short"], grid=grid, per_type=False)
    assert none == {} and common in (0.3, 0.4, 0.5, 0.6, 0.7) and common == 0.5  # a tie, broken towards 0.5
    common, per = select_thresholds(objective, ["open", "short"], grid=grid, per_type=True)
    assert common == 0.5 and per == {"open": 0.3, "short": 0.7}


def test_select_thresholds_keeps_the_common_threshold_on_ties() -> None:
    grid = [0.2, 0.4, 0.6]
    assert select_thresholds(lambda t, per: 1.0, ["open", "short"], grid=grid, per_type=True) == (0.4, {})
