"""Folder-per-class classification (``task=classify``, ``+experiment=folder``): each accepted image is fitted to the
crop size (``data.fit_mode``) and classified as a whole; there are no boards and no detector.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from defectops.core.taxonomy import TaskKind
from defectops.evaluation.shortcut import DEFAULT_FIX
from defectops.pipelines.context import StepError
from defectops.pipelines.tasks.base import Prepared, ShortcutInputs
from defectops.pipelines.tasks.crops import CropClassifierTask
from defectops.training.config import DataConfig
from defectops.training.snapshot import SPLITS, Snapshot


class ClassifyTask(CropClassifierTask):
    kind = TaskKind.classify
    model_task = "folder"
    shortcut_metadata = "image files"
    prepare_label = "fitting images"

    def check_snapshot(self, snap: Snapshot) -> None:
        if any("template" in x for x in snap.samples):
            raise StepError("task=classify classifies whole images, but this snapshot holds board pairs (a template "
                            "and a tested image): pass task=verify for DeepPCB-format or synthetic boards")

    def prepare(self, snap: Snapshot, accepted: Sequence[int], out: Path, data: DataConfig,
                progress: Callable[[int], None]) -> Prepared:
        from defectops.training.images import build_image_crops

        crops = build_image_crops(snap, accepted, out, data.candidates.crop_size, data.fit_mode, progress=progress,
                                  max_pixels=data.validation.max_image_pixels)
        per_split = {sp: dict(Counter(x["label"] for x in crops.samples if x["split"] == sp)) for sp in SPLITS}
        return Prepared(crops, {"crops": per_split})

    def shortcut_inputs(self, snap: Snapshot, used: Sequence[dict[str, Any]]) -> ShortcutInputs:
        from defectops.training.images import image_metadata

        feats, names = image_metadata([snap.file(x["source"]) for x in used])
        return ShortcutInputs(feats, names, DEFAULT_FIX)
