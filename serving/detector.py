"""Board-level defect detection: AOI candidates from template differencing, each classified by the crop model.

A candidate whose defect probability (``1 - p(good class)``) reaches the score threshold becomes a detection labelled
with its most likely defect type; its box is the candidate box mapped to DeepPCB's loose-box convention. Its
confidence is, by default, the probability of that type (``confidence="label"``): a detection is right only when its
type is, so a candidate that is surely a defect but could be an open or a mousebite ranks below one that is surely an
open. On DeepPCB this ranking raised the mAP by 0.1-0.3 points over ranking by the defect probability
(``confidence="defect"``) with the same detections, so the same F-score (``docs/deeppcb.md``). The
classifier is any function from crops (N, 3, H, W) float32 in [0, 1] to logits, so the same code scores the PyTorch
checkpoint (evaluation) and the ONNX model (verification, ``defectops predict boards``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectops.evaluation.deeppcb import Detection
from defectops.training.candidates import Candidate, detection_box, read_pair
from defectops.training.crops import propose
from defectops.training.engine import softmax

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DetectorSettings:
    """Everything besides the classifier that turns a board pair into detections."""

    classes: tuple[str, ...]
    good_class: str
    crop_size: int
    context: float
    candidates: dict[str, Any] = field(default_factory=dict)
    score_threshold: float = 0.5
    type_thresholds: dict[str, float] = field(default_factory=dict)  # per reported type; others: score_threshold
    box_margin: int = 6
    merge: bool = True
    confidence: str = "label"


CONFIDENCES = ("label", "defect")


def detections_from_probs(cands: Sequence[Candidate], probs: np.ndarray, s: DetectorSettings,
                          shape: tuple[int, int], threshold: float | None = None,
                          type_thresholds: Mapping[str, float] | None = None) -> list[Detection]:
    """Pure: candidates + class probabilities -> detections, sorted by descending confidence. A candidate is a
    detection when ``1 - p(good)`` reaches the threshold of its most likely defect type (``type_thresholds``, else
    ``threshold``; each defaults to the settings'); its confidence is that of ``s.confidence`` (``label``: the
    reported type's probability; ``defect``: ``1 - p(good)``)."""
    if s.confidence not in CONFIDENCES:
        raise ValueError(f"unknown detection confidence {s.confidence!r}: use one of {', '.join(CONFIDENCES)} "
                         f"(detect.confidence=...)")
    if len(cands) == 0:
        return []
    good = s.classes.index(s.good_class)
    defect_cols = [i for i in range(len(s.classes)) if i != good]
    score = 1.0 - probs[:, good]
    label_idx = np.asarray(defect_cols)[probs[:, defect_cols].argmax(axis=1)]
    confidence = probs[np.arange(len(probs)), label_idx] if s.confidence == "label" else score
    t = s.score_threshold if threshold is None else threshold
    per_type = s.type_thresholds if type_thresholds is None else type_thresholds
    dets = []
    for c, sc, conf, li in zip(cands, score, confidence, label_idx, strict=True):
        if sc >= per_type.get(s.classes[int(li)], t):
            x1, y1, x2, y2 = detection_box(c, s.box_margin, shape)
            dets.append(Detection(x1, y1, x2, y2, float(conf), s.classes[int(li)]))
    if s.merge:
        dets = merge_fragments(dets)
    dets.sort(key=lambda d: -d.confidence)
    return dets


THRESHOLD_GRID = tuple(round(0.05 * i, 3) for i in range(1, 20))  # 0.05 ... 0.95, the thresholds val chooses among
SELECT_OBJECTIVES: dict[str, Callable[[Any], float]] = {  # detect.select -> the val score a threshold maximises
    "fscore": lambda sc: sc.fscore, "map": lambda sc: sc.map, "mean": lambda sc: (sc.fscore + sc.map) / 2}


def select_thresholds(objective: Callable[[float, Mapping[str, float]], float], types: Sequence[str], *,
                      grid: Sequence[float], per_type: bool, passes: int = 2) -> tuple[float, dict[str, float]]:
    """Pure: the score threshold, and with ``per_type`` one per defect type, that maximise ``objective(threshold,
    type_thresholds)`` (a validation score).

    The common threshold is the best on ``grid`` (ties go to the one nearest 0.5). Per type, coordinate ascent from
    it: ``passes`` rounds over ``types``, each moving one type's threshold along ``grid`` to its best value with the
    others fixed (ties keep the current value). Returned per-type thresholds are those that differ from the common one.
    On unseen board designs the best threshold differs by type (false shorts on one design, missed opens on another):
    ``docs/deeppcb.md``.
    """
    base = max(grid, key=lambda t: (objective(t, {}), -abs(t - 0.5)))
    per: dict[str, float] = {}
    if per_type:
        per = dict.fromkeys(types, base)
        for _ in range(passes):
            for ty in types:
                def key(t: float, ty: str = ty, current: float = per[ty]) -> tuple[float, float]:
                    return objective(base, {**per, ty: t}), -abs(t - current)
                per[ty] = max(grid, key=key)
    return base, {k: v for k, v in per.items() if v != base}


def merge_fragments(dets: Sequence[Detection]) -> list[Detection]:
    """Pure: merge detections of the same type whose boxes overlap into one (union box, highest confidence).

    Template differencing can split one defect into several blobs; each would otherwise be reported, and under the
    one-to-one DeepPCB matching all but one would be false positives.
    """
    groups: list[list[Detection]] = []
    for d in sorted(dets, key=lambda d: -d.confidence):
        for g in groups:
            if g[0].label == d.label and any(_overlap(d, o) for o in g):
                g.append(d)
                break
        else:
            groups.append([d])
    merged = []
    for g in groups:
        if len(g) == 1:
            merged.append(g[0])
        else:
            merged.append(Detection(min(d.x1 for d in g), min(d.y1 for d in g), max(d.x2 for d in g),
                                    max(d.y2 for d in g), g[0].confidence, g[0].label))
    return merged


def _overlap(a: Detection, b: Detection) -> bool:
    return a.x1 <= b.x2 and b.x1 <= a.x2 and a.y1 <= b.y2 and b.y1 <= a.y2


@dataclass
class BoardResult:
    key: str
    shape: tuple[int, int]
    candidates: list[Candidate]
    probs: np.ndarray


class BoardDetector:
    """Candidates + batched classification over many board pairs, with decoding on a thread pool."""

    def __init__(self, logits_fn: LogitsFn, settings: DetectorSettings, *, threads: int = 2,
                 batch_boards: int = 8) -> None:
        self.logits_fn = logits_fn
        self.s = settings
        self.threads = threads
        self.batch_boards = batch_boards

    def _prepare(self, item: tuple[str, Path, Path]) -> tuple[str, tuple[int, int], list[Candidate], np.ndarray]:
        key, template_path, tested_path = item
        template, tested = read_pair(template_path, tested_path)
        cands, crops = propose(template, tested, self.s.candidates, self.s.crop_size, self.s.context)
        return key, (int(tested.shape[0]), int(tested.shape[1])), cands, crops

    def run(self, pairs: Iterable[tuple[str, Path, Path]]) -> Iterator[BoardResult]:
        """Yield a :class:`BoardResult` per (key, template, tested) in input order."""
        with ThreadPoolExecutor(self.threads) as pool:
            batch: list[tuple[str, tuple[int, int], list[Candidate], np.ndarray]] = []
            for prepared in pool.map(self._prepare, pairs):
                batch.append(prepared)
                if len(batch) >= self.batch_boards:
                    yield from self._classify(batch)
                    batch = []
            if batch:
                yield from self._classify(batch)

    def _classify(self, batch: list[tuple[str, tuple[int, int], list[Candidate], np.ndarray]]) -> Iterator[BoardResult]:
        crops = np.concatenate([b[3] for b in batch])
        if len(crops):
            x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
            probs = softmax(self.logits_fn(x))
        else:
            probs = np.zeros((0, len(self.s.classes)), np.float32)
        start = 0
        for key, shape, cands, c in batch:
            yield BoardResult(key, shape, cands, probs[start:start + len(c)])
            start += len(c)

    def detect(self, pairs: Iterable[tuple[str, Path, Path]]) -> Iterator[tuple[str, list[Detection]]]:
        for r in self.run(pairs):
            yield r.key, detections_from_probs(r.candidates, r.probs, self.s, r.shape)
