"""``validate_data``: quarantine unusable samples with a reason, then cut candidate crops from the accepted boards (or
fit the accepted images), and run the shortcut check on their metadata.

Reads: ``RUN.snapshot``. Writes: ``RUN.validation``, ``RUN.crops``, ``RUN.shortcut``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from defectops.core.fsutil import atomic_dir, write_json
from defectops.core.layout import RUN
from defectops.evaluation.shortcut import DEFAULT_FIX, shortcut_check
from defectops.pipelines.context import StepContext, StepError
from defectops.training.config import DataConfig
from defectops.training.snapshot import Snapshot, load_snapshot

READS = (RUN.snapshot,)
WRITES = (RUN.validation, RUN.crops, RUN.shortcut)



def validate_data(ctx: StepContext, data: DataConfig) -> dict[str, Any]:
    """Validate the snapshot (quarantine with reasons) and cut candidate crops from the accepted boards, or fit the
    accepted images. Fails over ``data.validation.max_bad_fraction`` (unusable or leaking samples) or
    ``data.validation.max_conflict_fraction`` (label conflicts); the result counts ``label_conflicts``."""
    from defectops.training.crops import build_crops
    from defectops.training.images import build_image_crops
    from defectops.training.validation import CONFLICT, validate_snapshot

    snap = load_snapshot(ctx.path(RUN.snapshot))
    advance = ctx.reporter.task("validating boards", len(snap.samples))
    report = validate_snapshot(snap, data.validation, progress=advance)
    write_json(ctx.path(RUN.validation), report.to_dict())
    v = data.validation
    bad = [q for q in report.quarantined if q.kind != CONFLICT]
    conflicts = [q for q in report.quarantined if q.kind == CONFLICT]
    if report.bad_fraction > v.max_bad_fraction:
        first = "; ".join(f"{q.path}: {q.reason}" for q in bad[:3])
        raise StepError(f"{len(bad)} of {report.total} samples quarantined (over "
                        f"data.validation.max_bad_fraction={v.max_bad_fraction}): {first}; "
                        f"full list in {ctx.path(RUN.validation)}")
    if report.conflict_fraction > v.max_conflict_fraction:
        first = "; ".join(f"{q.path}: {q.reason}" for q in conflicts[:3])
        raise StepError(f"{len(conflicts)} of {report.total} samples are label conflicts, the same content "
                        f"under two labels (over data.validation.max_conflict_fraction={v.max_conflict_fraction}): "
                        f"{first}; fix the class folders; full list in {ctx.path(RUN.validation)}")
    if report.quarantined:
        ctx.reporter.log(f"{report.summary()}; list in {ctx.path(RUN.validation)}")
    boards = any("template" in x for x in snap.samples)
    advance = ctx.reporter.task("cutting candidate crops" if boards else "fitting images", len(report.accepted))
    with atomic_dir(ctx.path(RUN.crops)) as tmp:
        if boards:
            crops, stats = build_crops(snap, report.accepted, tmp, data.candidates, snap.classes, data.good_class,
                                       progress=advance)
            extra = stats.to_dict()
        else:
            crops = build_image_crops(snap, report.accepted, tmp, data.candidates.crop_size, data.fit_mode,
                                      progress=advance, max_pixels=data.validation.max_image_pixels)
            extra = {"crops": {sp: dict(Counter(x["label"] for x in crops.samples if x["split"] == sp))
                               for sp in ("train", "val", "test")}}
    out = {"quarantined": len(report.quarantined), "accepted": len(report.accepted),
           "label_conflicts": len(conflicts), **extra, "crop_fingerprint": crops.fingerprint}
    shortcut = _shortcut_check(ctx, data, snap, crops, boards)
    if shortcut is not None:
        out["shortcut"] = shortcut
    return out


BOARD_SHORTCUT_FIX = ("the classifier can learn the candidate's size (crops are scaled to their box) instead of the "
                      "defect; check that false calls and defects come from boxes of similar sizes "
                      "(data.candidates.pad, data.candidates.add_missed_to_train)")


def _shortcut_check(ctx: StepContext, data: DataConfig, snap: Snapshot, crops: Snapshot, boards: bool
                    ) -> dict[str, Any] | None:
    """Run :func:`evaluation.shortcut.shortcut_check` on the train and val samples' metadata, write ``SHORTCUT`` and
    log a warning when it fires; returns the step result's summary. Never fails the step: an error becomes a note."""
    from defectops.training.crops import box_metadata
    from defectops.training.images import image_metadata

    cfg = data.shortcut
    path = ctx.path(RUN.shortcut)
    if not cfg.enabled:
        path.unlink(missing_ok=True)
        return None
    kind = "candidate boxes" if boards else "image files"
    try:
        used = [x for x in crops.samples if x["split"] in ("train", "val")]
        index = {c: i for i, c in enumerate(crops.classes)}
        y = np.array([index[x["label"]] for x in used], np.int64)
        if boards:
            feats, names = box_metadata([x["box"] for x in used])
        else:
            feats, names = image_metadata([snap.file(x["source"]) for x in used])
        rep = shortcut_check(feats, names, y, crops.classes, folds=cfg.folds, seed=data.split.seed,
                             warn_at=cfg.warn_at, fix=BOARD_SHORTCUT_FIX if boards else DEFAULT_FIX)
        doc: dict[str, Any] = {"metadata": kind, "splits": ["train", "val"], **rep.to_dict()}
    except Exception as e:  # the check is advice: a failure must not stop the run
        doc = {"metadata": kind, "warn": False, "score": None, "note": f"not checked: {type(e).__name__}: {e}"}
    write_json(path, doc)
    if doc.get("warn"):
        ctx.reporter.log(f"WARNING {doc['message']} (details: {path})")
    elif doc.get("note") and doc.get("score") is None:
        ctx.reporter.log(f"shortcut check: {doc['note']}")
    return {k: doc.get(k) for k in ("warn", "score", "top_feature", "top_feature_score", "note")}
