"""Candidate verification (``task=verify``, the default): classical AOI's candidates on board pairs (template + tested)
become crops (tested, template, difference) labelled with a defect type or ``false_call``; the trained classifier with
the candidate step is a board-level detector, scored with the DeepPCB metric on the val and test boards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from defectops.core.fsutil import read_json
from defectops.core.layout import RUN
from defectops.core.taxonomy import DEFECT_TYPES, TaskKind
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.tasks.base import Prepared, ShortcutInputs
from defectops.pipelines.tasks.crop_evaluate import LogitsFn
from defectops.pipelines.tasks.crops import CropClassifierTask
from defectops.serving.config import DetectConfig
from defectops.training.config import DataConfig
from defectops.training.snapshot import Snapshot, load_snapshot

SHORTCUT_FIX = ("the classifier can learn the candidate's size (crops are scaled to their box) instead of the "
                "defect; check that false calls and defects come from boxes of similar sizes "
                "(data.candidates.pad, data.candidates.add_missed_to_train)")


def task_classes(data: DataConfig) -> list[str]:
    """The classes of candidate verification: the good class (false call) and the DeepPCB defect types."""
    return [data.good_class, *DEFECT_TYPES]


class VerifyTask(CropClassifierTask):
    kind = TaskKind.verify
    model_task = "aoi"
    shortcut_metadata = "candidate boxes"
    prepare_label = "cutting candidate crops"

    def check_snapshot(self, snap: Snapshot) -> None:
        if not any("template" in x for x in snap.samples):
            raise StepError("task=verify needs board pairs (a template and a tested image), but this snapshot holds "
                            "single images: pass task=classify (as +experiment=folder does) for a folder-per-class "
                            "dataset")

    def prepare(self, snap: Snapshot, accepted: Sequence[int], out: Path, data: DataConfig,
                progress: Callable[[int], None]) -> Prepared:
        from defectops.training.crops import build_crops

        crops, stats = build_crops(snap, accepted, out, data.candidates, snap.classes, data.good_class,
                                   progress=progress)
        return Prepared(crops, stats.to_dict())

    def shortcut_inputs(self, snap: Snapshot, used: Sequence[dict[str, Any]]) -> ShortcutInputs:
        from defectops.training.crops import box_metadata

        feats, names = box_metadata([x["box"] for x in used])
        return ShortcutInputs(feats, names, SHORTCUT_FIX)

    def detection_scores(self, ctx: StepContext, data: DataConfig, detect: DetectConfig, classes: tuple[str, ...],
                         logits_fn: LogitsFn, confidence: float, chosen: dict[str, Any] | None = None
                         ) -> dict[str, Any] | None:
        """The board-level evaluation (:func:`serving.board_eval.board_evaluation`) on this run's val and test boards:
        thresholds chosen on val (``detect.score_threshold`` when set), unless ``chosen`` gives them."""
        from defectops.serving.board_eval import board_evaluation, board_split, detector_settings

        if not detect.enabled:
            return None
        snap = load_snapshot(ctx.path(RUN.snapshot))
        quarantined = {q["index"] for q in read_json(ctx.path(RUN.validation))["quarantined"]}
        boards = {split: board_split(snap, quarantined, split) for split in ("val", "test")}
        settings = detector_settings(classes, data.good_class, data.candidates, detect)
        threshold = chosen["score_threshold"] if chosen else detect.score_threshold
        per_type = chosen.get("type_thresholds") if chosen else None
        try:
            return board_evaluation(boards, settings, detect, logits_fn, threshold, confidence=confidence,
                                    type_thresholds=per_type, progress=ctx.reporter.task)
        except ValueError as e:
            raise StepError(str(e)) from None

    def export_metadata(self, ctx: StepContext) -> dict[str, Any]:
        detector = read_json(ctx.path(RUN.detector)) if ctx.path(RUN.detector).is_file() else {}
        return {"candidates": detector.get("candidates"), "detector": detector}

