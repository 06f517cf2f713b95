"""Turn a board snapshot into a crop snapshot: the AOI candidate step applied to every accepted board pair.

Each candidate from template differencing becomes a crop whose channels are (tested, template, |difference|),
labelled with the defect type of the ground-truth box it matches or ``false_call`` when it matches none. Defects the
candidate step misses are counted (that is the candidate stage's escape rate) and, for the training split only, added
as crops so that every defect type is learnt. Validation and test crops are exactly what the candidate step produces,
so evaluation measures what a line would see.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from defectops.core.taxonomy import Box
from defectops.training.candidates import (
    Candidate,
    align_template,
    candidate_settings,
    crop,
    find_candidates,
    iou,
    label_candidates,
    read_pair,
)
from defectops.training.config import CANDIDATE_PARAMS, CandidateConfig
from defectops.training.snapshot import Snapshot, write_snapshot


def candidate_params(cfg: CandidateConfig) -> dict[str, Any]:
    """The candidate-generation fields of ``cfg`` (:data:`CANDIDATE_PARAMS`) as a JSON-ready dict: what the detector
    settings and the exported model's metadata carry, and what :func:`propose` takes back."""
    return {name: getattr(cfg, name) for name in CANDIDATE_PARAMS}


def aligned_candidates(template: np.ndarray, tested: np.ndarray, params: dict[str, Any]
                       ) -> tuple[np.ndarray, list[Candidate]]:
    """The template aligned to the tested image (when ``params["align"]``) and the candidates found with it: crops
    must be cut from this template so the classifier sees what the candidate step saw."""
    cfg = candidate_settings(None, **params)
    if cfg.align:
        template, _ = align_template(template, tested, max_shift=cfg.max_shift)
    return template, find_candidates(template, tested, cfg, align=False)


def propose(template: np.ndarray, tested: np.ndarray, params: dict[str, Any], size: int, context: float
            ) -> tuple[list[Candidate], np.ndarray]:
    """Candidates of a board pair and their crops (N, size, size, 3): the one code path for training crops and for
    detection."""
    template, cands = aligned_candidates(template, tested, params)
    crops = (np.stack([crop(template, tested, c.box, size=size, context=context) for c in cands])
             if cands else np.zeros((0, size, size, 3), np.uint8))
    return cands, crops


@dataclass
class CropStats:
    boards: int = 0
    defects: Counter[str] = field(default_factory=Counter)
    found: Counter[str] = field(default_factory=Counter)
    crops: dict[str, Counter[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        recall = {k: self.found[k] / n for k, n in sorted(self.defects.items()) if n}
        total = sum(self.defects.values())
        return {"boards": self.boards, "defects": dict(self.defects), "candidate_recall": recall,
                "candidate_recall_overall": sum(self.found.values()) / total if total else None,
                "crops": {split: dict(c) for split, c in self.crops.items()}}


def _covered(gt: Box, cands: Sequence[Candidate], iou_threshold: float) -> bool:
    cx, cy = (gt.x1 + gt.x2) / 2, (gt.y1 + gt.y2) / 2
    return any(iou((c.x1, c.y1, c.x2, c.y2), (gt.x1, gt.y1, gt.x2, gt.y2)) > iou_threshold
               or (c.x1 <= cx <= c.x2 and c.y1 <= cy <= c.y2) for c in cands)


def box_metadata(boxes: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[str]]:
    """Geometry of candidate boxes ``(x1, y1, x2, y2)`` (inclusive pixel corners, as the crop manifest's ``box``):
    columns ``width``, ``height``, ``aspect`` (width / height) and ``area``, for
    :func:`evaluation.shortcut.shortcut_check`. Crops are scaled to their box, so a class told apart by box size
    alone may be learnt from scale cues (blur, line width) rather than from the defect."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    return np.stack([w, h, w / h, w * h], axis=1), ["width", "height", "aspect", "area"]


def build_crops(boards: Snapshot, accepted: Sequence[int], out_dir: Path, cfg: CandidateConfig,
                classes: Sequence[str], good_class: str, *,
                progress: Callable[[int], None] | None = None) -> tuple[Snapshot, CropStats]:
    """Write crop PNGs under ``out_dir/crops/<split>/`` and the crop snapshot's manifest in ``out_dir``."""
    stats = CropStats()
    samples: list[dict[str, Any]] = []
    for i in accepted:
        s = boards.samples[i]
        split = s["split"]
        template, tested = read_pair(boards.file(s["template"]), boards.file(s["path"]))
        gt = [Box(int(b[0]), int(b[1]), int(b[2]), int(b[3]), str(b[4])) for b in s.get("boxes", [])]
        template, cands = aligned_candidates(template, tested, candidate_params(cfg))
        labels = label_candidates(cands, gt, iou_threshold=cfg.iou_threshold, background=good_class)
        items: list[tuple[tuple[int, int, int, int], str, str]] = [
            ((c.x1, c.y1, c.x2, c.y2), lab, "candidate") for c, lab in zip(cands, labels, strict=True)]
        for g in gt:
            stats.defects[g.label] += 1
            if _covered(g, cands, cfg.iou_threshold):
                stats.found[g.label] += 1
            elif split == "train" and cfg.add_missed_to_train:
                items.append(((g.x1, g.y1, g.x2, g.y2), g.label, "missed-gt"))
        stem = Path(s["path"]).name.removesuffix("_test.jpg").removesuffix(Path(s["path"]).suffix)
        counter = stats.crops.setdefault(split, Counter())
        for k, (box, label, origin) in enumerate(items):
            rel = f"crops/{split}/{stem}_{k:03d}.png"
            img = crop(template, tested, box, size=cfg.crop_size, context=cfg.context)
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".png", img[:, :, ::-1])  # stored as RGB = (tested, template, diff)
            if not ok:
                raise RuntimeError(f"could not encode crop {rel}")
            data = buf.tobytes()
            dest.write_bytes(data)
            samples.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "label": label, "split": split,
                            "box": list(box), "origin": origin, "source": f"{s['path']}#{k}"})
            counter[label] += 1
        stats.boards += 1
        if progress:
            progress(1)
    snap = write_snapshot(out_dir, samples, classes, extra={"board_fingerprint": boards.fingerprint,
                                                            "stats": stats.to_dict()})
    return snap, stats
