"""Pure parts of the board detector: probabilities -> detections, and merging fragments of one defect."""

from __future__ import annotations

import numpy as np

from evaluation.deeppcb import Detection
from serving.detector import DetectorSettings, detections_from_probs, merge_fragments
from training.candidates import Candidate

CLASSES = ("false_call", "open", "short")


def _settings(**kw: object) -> DetectorSettings:
    return DetectorSettings(classes=CLASSES, good_class="false_call", crop_size=32, context=2.0, **kw)  # type: ignore[arg-type]


def test_threshold_label_and_box() -> None:
    cands = [Candidate(10, 10, 20, 20, 30), Candidate(100, 100, 110, 110, 30), Candidate(0, 0, 5, 5, 10)]
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.15, 0.05], [0.45, 0.5, 0.05]])
    dets = detections_from_probs(cands, probs, _settings(box_margin=6), (640, 640), threshold=0.5)
    assert [(d.label, round(d.confidence, 3)) for d in dets] == [("short", 0.9), ("open", 0.55)]
    assert (dets[0].x1, dets[0].y1, dets[0].x2, dets[0].y2) == (4, 4, 26, 26)
    assert (dets[1].x1, dets[1].y1) == (0, 0)  # clipped at the border
    assert detections_from_probs([], np.zeros((0, 3)), _settings(), (64, 64)) == []


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
