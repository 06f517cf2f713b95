"""Datasets in the YOLO segmentation layout (Ultralytics ``task: segment``), as KolektorSDD ships:
``images/<split>/<name>.<ext>`` with ``labels/<split>/<name>.txt`` beside them, one polygon a line
(``<class> x1 y1 x2 y2 ...``, coordinates normalised to [0, 1] by image width and height). An empty label file is a
good (defect-free) sample; a missing one is an error, not a guess.

For anomaly detection only "good or defective, and where" matters: :func:`read_yolo_seg` returns each image with its
polygons; :func:`rasterize` turns polygons into a mask at any size (pixel AUROC, boxes for recall at IoU);
:func:`yolo_seg_samples` makes snapshot manifest entries of them (``data.source=yolo_seg``).

Splits: the dataset's split folders are kept (``train``; ``val``, ``valid`` or ``validation``; ``test``). A dataset
without a test folder gets one carved from its train folder, ``data.split.test`` of it, keyed by each file's SHA-256
(:func:`training.snapshot.assign_split`), so byte-identical files always share a split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectops.training.snapshot import assign_split, escape_reason

__all__ = ["CLASSES", "IMAGE_SUFFIXES", "SegSample", "YoloSegError", "rasterize", "read_yolo_seg", "yolo_seg_samples"]

CLASSES = ("good", "defect")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class YoloSegError(ValueError):
    """A YOLO-segmentation dataset that cannot be read as one (the message names the file and the fix)."""


@dataclass(frozen=True)
class SegSample:
    """One image: its path, the split folder it came from, and its defect polygons (normalised x, y pairs)."""

    path: Path
    split: str
    polygons: tuple[tuple[tuple[float, float], ...], ...]
    escapes: str | None = None
    """Why ``path`` leads outside the dataset root (a symlink out), or None; such an image is never opened."""

    @property
    def defective(self) -> bool:
        return bool(self.polygons)


def _polygons(label: Path) -> tuple[tuple[tuple[float, float], ...], ...]:
    out = []
    for n, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            raise YoloSegError(f"{label} line {n}: not numbers ({line[:60]!r}): expected '<class> x1 y1 x2 y2 ...'") \
                from None
        if len(values) < 6 or len(values) % 2:
            raise YoloSegError(f"{label} line {n}: {len(values)} coordinates; a polygon needs an even number, at "
                               "least 6 (3 points)")
        if min(values) < 0.0 or max(values) > 1.0:
            raise YoloSegError(f"{label} line {n}: coordinates outside [0, 1]; YOLO labels are normalised by the "
                               "image size")
        out.append(tuple(zip(values[0::2], values[1::2], strict=True)))
    return tuple(out)


def read_yolo_seg(root: Path) -> list[SegSample]:
    """Every image under ``root/images/<split>/`` with its label file's polygons, sorted by split and name."""
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise YoloSegError(f"{root} has no images/ folder: a YOLO segmentation dataset holds images/<split>/ and "
                           "labels/<split>/")
    samples = []
    for folder in ("images", "labels"):
        if reason := escape_reason(root, folder):
            raise YoloSegError(f"{root / folder} {reason}: keep the dataset's folders inside it")
    for split_dir in sorted(p for p in images.iterdir() if not escape_reason(root, f"images/{p.name}") and p.is_dir()):
        for img in sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = f"images/{split_dir.name}/{img.name}"
            label = root / "labels" / split_dir.name / f"{img.stem}.txt"
            if reason := escape_reason(root, f"labels/{split_dir.name}/{img.stem}.txt"):
                raise YoloSegError(f"label file {label} {reason}: keep labels inside the dataset")
            if not label.is_file():
                raise YoloSegError(f"{img} has no label file {label}: add an empty one for a good sample")
            samples.append(SegSample(img, split_dir.name, _polygons(label), escape_reason(root, rel)))
    if not samples:
        raise YoloSegError(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)}) in split folders")
    return samples


def rasterize(polygons: tuple[tuple[tuple[float, float], ...], ...], width: int, height: int) -> np.ndarray:
    """A boolean ``height x width`` mask of the (normalised) polygons filled."""
    import cv2

    mask = np.zeros((height, width), np.uint8)
    for poly in polygons:
        pts = np.round(np.array(poly, np.float64) * [width, height]).astype(np.int32)
        cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1)
    return mask.astype(bool)


def yolo_seg_samples(root: Path, *, test: float, seed: int) -> list[dict[str, Any]]:
    """Snapshot manifest entries of a YOLO segmentation dataset read in place: ``path`` (relative to ``root``),
    ``sha256``, ``label`` (``good`` or ``defect``), ``split``, ``source`` and ``polygons`` (normalised x, y pairs).

    Byte-identical copies are kept once (the first in split-folder and name order), as the folder importer does:
    KolektorSDD holds 16 such pairs, which validation would otherwise quarantine as duplicates.

    Dataset roots are closed: an image that is a symlink leading outside ``root`` is never opened; it is listed
    without ``sha256`` and validation quarantines it with the reason. A split folder linked outside is skipped, and
    ``images/``, ``labels/`` or a label file leading outside raise :class:`YoloSegError`."""
    root = Path(root)
    found = read_yolo_seg(root)
    unknown = sorted({s.split for s in found} - set(SPLIT_NAMES))
    if unknown:
        raise YoloSegError(f"{root / 'images'} has split folders {', '.join(unknown)}: name them train, val or test")
    carve = not any(SPLIT_NAMES[s.split] == "test" for s in found)
    samples = []
    seen: set[str] = set()
    for s in found:
        rel = s.path.relative_to(root).as_posix()
        digest = "" if s.escapes else hashlib.sha256(s.path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        if digest:
            seen.add(digest)
        split = SPLIT_NAMES[s.split]
        if carve and split == "train":
            split = "test" if assign_split(digest or f"path:{rel}", 0.0, test, seed) == "test" else "train"
        sample = {"path": rel, "sha256": digest, "label": CLASSES[1] if s.defective else CLASSES[0], "split": split,
                  "source": f"yolo_seg:{root.name}", "polygons": [list(map(list, p)) for p in s.polygons]}
        if not digest:
            del sample["sha256"]  # never opened: validation quarantines it with the reason
        samples.append(sample)
    return samples
