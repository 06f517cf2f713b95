"""What the anomaly task's evaluate and verify_export share: scoring a split through PyTorch or onnxruntime, and
judging the test split at the threshold chosen on val (:func:`judge`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectops.evaluation.gates import GateConfig
from defectops.evaluation.metrics import ClassificationMetrics
from defectops.pipelines.context import StepError
from defectops.serving.onnx_export import ANOMALY_OUTPUTS
from defectops.training.config import AnomalyConfig
from defectops.training.snapshot import Snapshot, resampling_units

DEFECT = "defect"
OUTPUTS = ANOMALY_OUTPUTS
Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Scores:
    """Image scores, anomaly maps, labels and paths of one split, and its images (uint8 N x H x W x 3)."""

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray
    paths: list[str]
    images: np.ndarray


def score_split(crops: Snapshot, split: str, scorer: Scorer, cfg: AnomalyConfig) -> Scores:
    """Scores and maps of every image of ``split`` through ``scorer`` (PyTorch or onnxruntime)."""
    from defectops.training.data import load_split

    x, y, paths = load_split(crops, split)
    if len(y) == 0:
        return Scores(np.zeros(0), np.zeros((0, cfg.height, cfg.width), np.float32), y, paths, x)
    scores, maps = [], []
    for i in range(0, len(x), cfg.batch_size):
        s, m = scorer(x[i:i + cfg.batch_size])
        scores.append(s.reshape(-1))
        maps.append(m.reshape(len(s), *m.shape[-2:]).astype(np.float32))
    return Scores(np.concatenate(scores).astype(np.float64), np.concatenate(maps), y, paths, x)



def torch_scorer(net: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import torch

    from defectops.training.data import to_tensor

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            s, m = net(to_tensor(images))
        return s.numpy(), m.numpy()

    return score


@dataclass(frozen=True)
class Judged:
    """The operating point from val and the test split judged at it."""

    scored: Any  # evaluation.scoring.Scored
    logits: np.ndarray
    doc: dict[str, Any]


def judge(val: Scores, test: Scores, crops: Snapshot, cfg: AnomalyConfig, good_class: str,
           gates: GateConfig, champion: ClassificationMetrics | None = None) -> Judged:
    """Choose the threshold on ``val``, judge ``test`` at it with the gates (against ``champion``'s metrics on the
    same test images when given), and record AUROCs."""
    from defectops.evaluation.anomaly import (
        ScoreNormalization,
        auroc_interval,
        choose_threshold,
        pixel_auroc,
    )
    from defectops.evaluation.scoring import score_crops

    good = crops.classes.index(good_class)
    val_bad = val.labels != good
    if len(val.labels) == 0:
        raise StepError("the val split has no images: the anomaly threshold is chosen there; raise data.split.val")
    try:
        thr = choose_threshold(val_bad, val.scores, max_escape_rate=cfg.target_escape_rate,
                               max_false_call_rate=cfg.false_call_budget)
    except ValueError as e:
        raise StepError(f"{e} (anomaly.target_escape_rate / anomaly.false_call_budget)") from None
    norm = ScoreNormalization.fit(thr.value, val.scores[~val_bad])
    logits = logits_at(test.scores, norm, crops.classes, good_class)
    units = resampling_units(crops, test.paths)
    scored = score_crops(logits, test.labels, crops.classes, good_class, units, gates, champion=champion)
    test_bad = test.labels != good
    masks = masks_for(crops, test.paths, test.maps.shape[-2:])
    doc = {"threshold": thr.to_dict(), "normalization": norm.to_dict(),
           "val": {"image_auroc": auroc_interval(val_bad, val.scores, confidence=gates.confidence).to_dict(),
                   "n_good": int((~val_bad).sum()), "n_defect": int(val_bad.sum())},
           "test": {"image_auroc": auroc_interval(test_bad, test.scores, confidence=gates.confidence).to_dict(),
                    "pixel_auroc": pixel_auroc(masks, test.maps) if masks is not None else None,
                    "n_good": int((~test_bad).sum()), "n_defect": int(test_bad.sum())}}
    if board_crops(crops):
        doc["boxes"] = judge_boxes(crops, val, test, cfg, good_class, gates.confidence)
    return Judged(scored, logits, doc)


def logits_at(scores: np.ndarray, norm: Any, classes: Sequence[str], good_class: str) -> np.ndarray:
    """Two-class log-probabilities (columns in ``classes`` order) of raw ``scores`` at an operating point ``norm``
    (:class:`evaluation.anomaly.ScoreNormalization`): what the classifiers' metrics and gates take."""
    from defectops.evaluation.anomaly import anomaly_probabilities

    logits: np.ndarray = np.log(np.clip(anomaly_probabilities(scores, norm), 1e-300, 1.0)).astype(np.float64)
    return logits[:, ::-1] if list(classes).index(good_class) != 0 else logits


def board_crops(crops: Snapshot) -> bool:
    """Images prepared from board pairs (templates and tested images with boxes)."""
    return any(s.get("origin") == "tested" for s in crops.samples)


def box_truths(crops: Snapshot, sc: Scores) -> list[list[tuple[float, float, float, float]] | None]:
    """Per image of ``sc``: its annotated boxes in map pixels (tested images), or None (templates, plain images)."""
    by_path = {s["path"]: s for s in crops.samples}
    h, w = (int(v) for v in sc.maps.shape[-2:])
    out: list[list[tuple[float, float, float, float]] | None] = []
    for p in sc.paths:
        s = by_path[p]
        out.append([(b[0] * w, b[1] * h, b[2] * w, b[3] * h) for b in s.get("boxes") or ()]
                   if s.get("origin") == "tested" else None)
    return out


def judge_boxes(crops: Snapshot, val: Scores, test: Scores, cfg: AnomalyConfig, good_class: str,
                confidence: float) -> dict[str, Any]:
    """Board pairs: boxes from the anomaly maps, type-agnostic, scored by the DeepPCB rule. The map threshold is
    chosen on val's tested images (:func:`evaluation.anomaly_boxes.choose_map_threshold`), then test is scored at it;
    boxes drawn on good images (templates, defect-free tested boards) are counted as box-level false calls."""
    from defectops.evaluation.anomaly_boxes import choose_map_threshold, score_map_boxes

    def parts(sc: Scores) -> tuple[list[np.ndarray], list[list[tuple[float, float, float, float]]], list[np.ndarray]]:
        truths = box_truths(crops, sc)
        bad = [k for k, t in enumerate(truths) if t]
        good = [k for k, p in enumerate(sc.labels) if crops.classes[int(p)] == good_class]
        return [sc.maps[k] for k in bad], [truths[k] or [] for k in bad], [sc.maps[k] for k in good]

    vm, vg, vgood = parts(val)
    try:
        thr = choose_map_threshold(vm, vg, min_area=cfg.box_min_area)
    except ValueError as e:
        return {"note": f"{e}; box figures need annotated defects among the val boards"}
    tm, tg, tgood = parts(test)
    return {"map_threshold": thr.to_dict(), "min_area": cfg.box_min_area,
            "val": score_map_boxes(vm, vg, thr.value, min_area=cfg.box_min_area, good_maps=vgood,
                                   confidence=confidence).to_dict(),
            "test": score_map_boxes(tm, tg, thr.value, min_area=cfg.box_min_area, good_maps=tgood,
                                    confidence=confidence).to_dict()}


def masks_for(crops: Snapshot, paths: Sequence[str], hw: tuple[int, ...]) -> np.ndarray | None:
    """Ground-truth masks of the test images at map resolution, when the dataset has polygons (else None)."""
    from defectops.training.yolo_seg import rasterize

    by_path = {s["path"]: s for s in crops.samples}
    defective = [p for p in paths if by_path[p]["label"] == DEFECT]
    if not defective or not all(by_path[p].get("polygons") for p in defective):
        return None  # pixel AUROC needs the outline of every defect
    h, w = int(hw[0]), int(hw[1])
    return np.stack([rasterize(tuple(tuple(map(tuple, poly)) for poly in by_path[p].get("polygons") or ()), w, h)
                     for p in paths])
