"""``validate_data``: quarantine unusable samples with a reason, then cut candidate crops from the accepted boards (or
fit the accepted images), and run the shortcut check on their metadata.

Reads: ``RUN.snapshot``. Writes: ``RUN.validation``, ``RUN.crops``, ``RUN.shortcut``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from defectops.core.fsutil import atomic_dir, write_json
from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.evaluation.shortcut import shortcut_check
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import ValidateDataResult
from defectops.pipelines.tasks import Task, create_task
from defectops.training.config import AnomalyConfig, DataConfig
from defectops.training.snapshot import Snapshot, load_snapshot

READS = (RUN.snapshot,)
MAX_LISTED = 20  # quarantined samples named in the step's warning; validation.json and report.html list them all
WRITES = (RUN.validation, RUN.crops, RUN.shortcut)


def validate_data(ctx: StepContext, data: DataConfig, task: TaskKind, anomaly: AnomalyConfig) -> ValidateDataResult:
    """Validate the snapshot (quarantine with reasons), then let the task make its training samples from the accepted
    ones (candidate crops from boards, or fitted images). Fails over the bad-file budget (unusable, escaping or
    leaking samples; :func:`training.validation.bad_file_budget` of ``data.validation.max_bad_fraction`` and
    ``max_class_loss``) or ``data.validation.max_conflict_fraction`` (label conflicts); within them the quarantined
    samples are logged as a ``WARNING`` with their reasons (and ``report.html`` lists them). The result counts
    ``label_conflicts``."""
    from defectops.training.validation import CONFLICT, validate_snapshot

    snap = load_snapshot(ctx.path(RUN.snapshot))
    kind = create_task(task, anomaly=anomaly)
    kind.check_snapshot(snap)
    advance = ctx.reporter.task("validating samples", len(snap.samples))
    report = validate_snapshot(snap, data.validation, progress=advance)
    write_json(ctx.path(RUN.validation), report.to_dict())
    v = data.validation
    conflicts = [q for q in report.quarantined if q.kind == CONFLICT]
    if report.over_budget:
        raise StepError(f"{report.budget_message()}; full list in {ctx.path(RUN.validation)}")
    if report.conflict_fraction > v.max_conflict_fraction:
        first = "; ".join(f"{q.path}: {q.reason}" for q in conflicts[:3])
        raise StepError(f"{len(conflicts)} of {report.total} samples are label conflicts, the same content "
                        f"under two labels (over data.validation.max_conflict_fraction={v.max_conflict_fraction}): "
                        f"{first}; fix the class folders; full list in {ctx.path(RUN.validation)}")
    if report.quarantined:
        shown = report.quarantined[:MAX_LISTED]
        more = len(report.quarantined) - len(shown)
        ctx.reporter.log(f"WARNING {report.summary()}; {report.budget_message(first_reason=False)}; training goes "
                         "on without them: "
                         + "; ".join(f"{q.path}: {q.reason}" for q in shown)
                         + (f"; ... {more} more" if more else "") + f" (full list in {ctx.path(RUN.validation)})")
    advance = ctx.reporter.task(kind.prepare_label, len(report.accepted))
    with atomic_dir(ctx.path(RUN.crops)) as tmp:
        prepared = kind.prepare(snap, report.accepted, tmp, data, advance)
    crops = prepared.crops
    return ValidateDataResult(len(report.quarantined), len(report.accepted), len(conflicts), crops.fingerprint,
                              prepared.summary, _shortcut_check(ctx, data, snap, crops, kind))


def _shortcut_check(ctx: StepContext, data: DataConfig, snap: Snapshot, crops: Snapshot, task: Task
                    ) -> dict[str, Any] | None:
    """Run :func:`evaluation.shortcut.shortcut_check` on the train and val samples' metadata, write ``SHORTCUT`` and
    log a warning when it fires; returns the step result's summary. Never fails the step: an error becomes a note."""
    cfg = data.shortcut
    path = ctx.path(RUN.shortcut)
    if not cfg.enabled:
        path.unlink(missing_ok=True)
        return None
    kind = task.shortcut_metadata
    try:
        used = [x for x in crops.samples if x["split"] in ("train", "val")]
        index = {c: i for i, c in enumerate(crops.classes)}
        y = np.array([index[x["label"]] for x in used], np.int64)
        inputs = task.shortcut_inputs(snap, used)
        rep = shortcut_check(inputs.features, inputs.names, y, crops.classes, folds=cfg.folds, seed=data.split.seed,
                             warn_at=cfg.warn_at, fix=inputs.fix)
        doc: dict[str, Any] = {"metadata": kind, "splits": ["train", "val"], **rep.to_dict()}
    except Exception as e:  # noqa: BLE001 - the check is advice: a failure must not stop the run
        doc = {"metadata": kind, "warn": False, "score": None, "note": f"not checked: {type(e).__name__}: {e}"}
    write_json(path, doc)
    if doc.get("warn"):
        ctx.reporter.log(f"WARNING {doc['message']} (details: {path})")
    elif doc.get("note") and doc.get("score") is None:
        ctx.reporter.log(f"shortcut check: {doc['note']}")
    return {k: doc.get(k) for k in ("warn", "score", "top_feature", "top_feature_score", "note")}
