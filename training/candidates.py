"""AOI candidate step: template differencing into candidate boxes, candidate labelling, and classifier crops.

Why: a PCB AOI machine does not run a detector over the whole board; it subtracts the aligned golden template from the
tested image and hands every difference blob ("candidate") to a classifier that says which defect it is or that it is
a false call. This module is that first step for DefectOps: it must find (nearly) every real defect while keeping the
number of candidates small, and it turns candidates into fixed-size 3-channel crops (tested, template, difference).
It also reads DeepPCB pairs and annotations, raising errors that name the offending file.

Default parameters are sensible for DeepPCB-like 640 px binarized scans (JPEG-degraded): binarize at 128, XOR, a 3x3
opening that removes the 1-2 px edge misregistration every real pair has, then connected components.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training.synth import DEFECT_TYPES, Box

BINARIZE_AT = 128
CLEANUP_KERNEL = 3  # side of the square opening applied to the difference mask
MIN_CROP_SIDE = 16


@dataclass(frozen=True)
class Candidate:
    """Inclusive box of one (merged, padded, clipped) difference blob; ``area`` is its count of difference pixels."""

    x1: int
    y1: int
    x2: int
    y2: int
    area: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x1, self.y1, self.x2, self.y2


def _check_pair(template: np.ndarray, tested: np.ndarray) -> None:
    if template.ndim != 2 or tested.ndim != 2:
        raise ValueError(f"expected 2-D grayscale images, got shapes {template.shape} and {tested.shape}")
    if template.shape != tested.shape:
        raise ValueError(f"template shape {template.shape} != tested shape {tested.shape}")


def difference_mask(template: np.ndarray, tested: np.ndarray, *, threshold: int = 64) -> np.ndarray:
    """Binary (0/1 uint8) mask of pixels where the re-binarized images differ by more than ``threshold``,
    after a small opening that removes sub-3-px slivers (edge misregistration, JPEG ringing)."""
    _check_pair(template, tested)
    t = np.where(template >= BINARIZE_AT, 255, 0).astype(np.uint8)
    s = np.where(tested >= BINARIZE_AT, 255, 0).astype(np.uint8)
    diff: np.ndarray = (cv2.absdiff(t, s) > threshold).astype(np.uint8)
    if CLEANUP_KERNEL > 1:
        diff = cv2.morphologyEx(diff, cv2.MORPH_OPEN, np.ones((CLEANUP_KERNEL, CLEANUP_KERNEL), np.uint8))
    return diff


def find_candidates(
    template: np.ndarray,
    tested: np.ndarray,
    *,
    threshold: int = 64,
    min_area: int = 4,
    pad: int = 4,
    merge_distance: int = 3,
    max_candidates: int = 200,
) -> list[Candidate]:
    """Difference blobs between two aligned grayscale images, sorted by (y1, x1).

    Blobs smaller than ``min_area`` pixels are dropped; blobs separated by at most ``merge_distance`` pixels are merged
    into one candidate; boxes are padded by ``pad`` and clipped to the image. When more than ``max_candidates`` remain,
    the largest ones (by area) are kept.
    """
    if max_candidates <= 0:
        return []
    diff = difference_mask(template, tested, threshold=threshold)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(diff, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= max(min_area, 1)
    mask = keep[labels].astype(np.uint8)
    if not mask.any():
        return []
    if merge_distance > 0:
        grown = cv2.dilate(mask, np.ones((merge_distance + 1, merge_distance + 1), np.uint8))
        _, groups = cv2.connectedComponents(grown, connectivity=8)
    else:
        _, groups = cv2.connectedComponents(mask, connectivity=8)
    ys, xs = np.nonzero(mask)
    g = groups[ys, xs]
    order = np.argsort(g, kind="stable")
    g, ys, xs = g[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    x1s, x2s = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y1s, y2s = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    areas = np.diff(np.r_[starts, g.size])
    h, w = diff.shape
    cands = [
        Candidate(
            max(int(a) - pad, 0), max(int(b) - pad, 0), min(int(c) + pad, w - 1), min(int(d) + pad, h - 1), int(e)
        )
        for a, b, c, d, e in zip(x1s, y1s, x2s, y2s, areas, strict=True)
    ]
    if len(cands) > max_candidates:
        cands = sorted(cands, key=lambda c: (-c.area, c.y1, c.x1))[:max_candidates]
    return sorted(cands, key=lambda c: (c.y1, c.x1, c.y2, c.x2))


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two inclusive pixel boxes ``(x1, y1, x2, y2)``."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / float(area_a + area_b - inter)


def _box_of(b: Box | Candidate) -> tuple[int, int, int, int]:
    return b.x1, b.y1, b.x2, b.y2


def _contains(box: tuple[int, int, int, int], x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def label_candidates(
    cands: Sequence[Candidate], gt: Sequence[Box], *, iou_threshold: float = 0.1, background: str = "false_call"
) -> list[str]:
    """Label each candidate with its best-matching ground-truth box's label, else ``background``.

    A GT box matches when IoU > ``iou_threshold`` or the candidate's centre lies inside it; among matches the highest
    IoU wins (earlier GT on ties). One GT box may label several candidates (a defect split into blobs).
    """
    gt_boxes = [_box_of(g) for g in gt]
    out: list[str] = []
    for c in cands:
        cb = _box_of(c)
        cx, cy = (c.x1 + c.x2) / 2, (c.y1 + c.y2) / 2
        best, best_iou = background, -1.0
        for g, gb in zip(gt, gt_boxes, strict=True):
            v = iou(cb, gb)
            if (v > iou_threshold or _contains(gb, cx, cy)) and v > best_iou:
                best, best_iou = g.label, v
        out.append(best)
    return out


def gt_found(cands: Sequence[Candidate], gt: Sequence[Box], *, iou_threshold: float = 0.1) -> list[bool]:
    """Per GT box: found by some candidate (IoU > ``iou_threshold`` or the candidate contains the GT centre).
    ``sum(found) / len(found)`` is the candidate step's recall."""
    boxes = [_box_of(c) for c in cands]
    out: list[bool] = []
    for g in gt:
        gb = _box_of(g)
        cx, cy = (g.x1 + g.x2) / 2, (g.y1 + g.y2) / 2
        out.append(any(iou(cb, gb) > iou_threshold or _contains(cb, cx, cy) for cb in boxes))
    return out


def crop(
    template: np.ndarray,
    tested: np.ndarray,
    box: tuple[int, int, int, int],
    *,
    size: int = 64,
    context: float = 2.0,
) -> np.ndarray:
    """Square ``size`` x ``size`` x 3 uint8 crop centred on ``box``: channels (tested, template, |tested - template|).

    The window side is ``max(box w, box h) * context`` (at least 16 px), zero-padded outside the image, shrunk with
    INTER_AREA or enlarged with INTER_NEAREST. Channel 2 is computed after resizing, so it equals
    ``cv2.absdiff(crop[..., 0], crop[..., 1])`` exactly.
    """
    _check_pair(template, tested)
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"invalid box {box}: need x1 <= x2 and y1 <= y2")
    if size < 1 or context <= 0:
        raise ValueError(f"size must be >= 1 and context > 0, got size={size}, context={context}")
    side = max(MIN_CROP_SIDE, round(max(x2 - x1 + 1, y2 - y1 + 1) * context))
    ox = round((x1 + x2 + 1) / 2 - side / 2)
    oy = round((y1 + y2 + 1) / 2 - side / 2)
    h, w = tested.shape
    sx1, sy1, sx2, sy2 = max(ox, 0), max(oy, 0), min(ox + side, w), min(oy + side, h)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_NEAREST
    channels: list[np.ndarray] = []
    for img in (tested, template):
        window = np.zeros((side, side), np.uint8)
        if sx2 > sx1 and sy2 > sy1:
            window[sy1 - oy : sy2 - oy, sx1 - ox : sx2 - ox] = img[sy1:sy2, sx1:sx2]
        channels.append(cv2.resize(window, (size, size), interpolation=interp))
    channels.append(cv2.absdiff(channels[0], channels[1]))
    return np.dstack(channels)


def _looks_truncated_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _read_gray(path: Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ValueError(f"image {path} is empty")
    if _looks_truncated_jpeg(data):
        raise ValueError(f"image {path} is a truncated JPEG (no end-of-image marker)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None or img.size == 0:
        raise ValueError(f"image {path} is corrupt or not an image")
    return img


def read_pair(template_path: Path, tested_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an aligned (template, tested) pair as grayscale uint8; ValueError names the bad file."""
    template = _read_gray(template_path)
    tested = _read_gray(tested_path)
    if template.shape != tested.shape:
        raise ValueError(
            f"size mismatch: template {template_path} is {template.shape[1]}x{template.shape[0]}, "
            f"tested {tested_path} is {tested.shape[1]}x{tested.shape[0]}"
        )
    return template, tested


_SEP = re.compile(r"[,\s]+")


def parse_deeppcb_line(line: str) -> Box:
    """One ``x1 y1 x2 y2 type`` line (spaces or commas); type is 1-6 or a DEFECT_TYPES name. ValueError if bad."""
    parts = [p for p in _SEP.split(line.strip()) if p]
    if len(parts) != 5:
        raise ValueError(f"expected 5 fields 'x1 y1 x2 y2 type', got {len(parts)}")
    try:
        x1, y1, x2, y2 = (int(p) for p in parts[:4])
    except ValueError as exc:
        raise ValueError(f"non-integer coordinate in {parts[:4]}") from exc
    kind = parts[4]
    if kind.isdigit() and 1 <= int(kind) <= len(DEFECT_TYPES):
        label = DEFECT_TYPES[int(kind) - 1]
    elif kind in DEFECT_TYPES:
        label = kind
    else:
        raise ValueError(f"unknown defect type {kind!r} (expected 1-{len(DEFECT_TYPES)} or one of {DEFECT_TYPES})")
    if x1 < 0 or y1 < 0 or x2 < x1 or y2 < y1:
        raise ValueError(f"invalid box ({x1}, {y1}, {x2}, {y2})")
    return Box(x1, y1, x2, y2, label)


def read_deeppcb_annotations(path: Path) -> list[Box]:
    """Read a DeepPCB annotation file; blank lines are skipped. ValueError names the file and line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not an ASCII annotation file") from exc
    boxes: list[Box] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            boxes.append(parse_deeppcb_line(line))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}: {line.strip()!r}") from exc
    return boxes
