"""AOI candidate step: template differencing into candidate boxes, candidate labelling, and classifier crops.

Why: a PCB AOI machine does not run a detector over the whole board; it subtracts the aligned golden template from the
tested image and hands every difference blob ("candidate") to a classifier that says which defect it is or that it is
a false call. This module is that first step for DefectOps: it must find (nearly) every real defect while keeping the
number of candidates small, and it turns candidates into fixed-size 3-channel crops (tested, template, difference).
It also reads DeepPCB pairs and annotations, raising errors that name the offending file.

Defaults are tuned on the train part of our DeepPCB split (``benchmarks/deeppcb_candidates.py`` prints the table) for
640 px binarized, JPEG-degraded scans scored at IoU > 0.33 against loose boxes:

- binarize at 128 and re-register: about a fifth of the DeepPCB pairs are off by 1-7 px (a global translation), which
  turns every trace edge into a difference strip; :func:`estimate_shift` finds the shift from row/column profiles and
  refines it on the XOR pixel count (about 0.3 ms), and the template is moved by it before differencing;
- XOR, then an opening with a 3x3 *cross*: it removes the 1-2 px edge slivers of residual misregistration like a 3x3
  square does, but keeps dotted and thin-but-3-px defects that a square shreds;
- 8-connected blobs of at least ``min_area`` pixels, merged when at most ``merge_distance`` pixels apart;
- a merged group with a side longer than ``split_side`` is nearly always a defect fused with a strip of local
  misregistration, so it is opened again with a 5x5 square and replaced by the groups that survive (if any);
- on DeepPCB the comparison has a 1 px position tolerance (``tolerance``): residual local misregistration then leaves
  no difference at all instead of strips that fuse with a nearby defect into one oversized box; hairline defects the
  tolerance erases come back from a second pass on the exact difference (``exact_min_area``), kept where they touch no
  candidate of the first pass (the candidate recall at IoU > 0.33 rose from 0.9905 to 0.9969 on the train part);
- candidate boxes are the blob's tight box padded by ``pad`` (the classifier's crop geometry); :func:`detection_box`
  grows them to DeepPCB's loose-box convention (tight box + 10 px) for the reported detection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from defectops.core.taxonomy import DEFECT_TYPES, Box
from defectops.training.config import CANDIDATE_PARAMS, CandidateConfig

BINARIZE_AT = 128
CLEANUP_KERNEL = 3  # side of the cross-shaped opening applied to the difference mask
MIN_CROP_SIDE = 16
MAX_SHIFT = CandidateConfig.max_shift  # largest misregistration (px, each axis) that alignment corrects by default
SPLIT_KERNEL = 5  # side of the square opening that separates a defect from a fused misregistration strip
DETECTION_MARGIN = 10  # DeepPCB boxes are the defect's tight box plus ~10 px (median margin on each side)
DEFAULT_PAD = CandidateConfig.pad
DETECTION_GROW = DETECTION_MARGIN - DEFAULT_PAD  # grows a default-padded candidate box into a detection box


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


_CLEANUP = cv2.getStructuringElement(cv2.MORPH_CROSS, (CLEANUP_KERNEL, CLEANUP_KERNEL))
_CLOSING = np.ones((3, 3), np.uint8)
_SPLIT = np.ones((SPLIT_KERNEL, SPLIT_KERNEL), np.uint8)


def _binarize(img: np.ndarray) -> np.ndarray:
    """0/255 uint8 image: 255 where ``img >= BINARIZE_AT``."""
    if img.dtype == np.uint8:
        return cv2.threshold(img, BINARIZE_AT - 1, 255, cv2.THRESH_BINARY)[1]
    return np.where(img >= BINARIZE_AT, 255, 0).astype(np.uint8)


def _xor_count(t: np.ndarray, s: np.ndarray, dy: int, dx: int, r: int) -> int:
    """Differing pixels between ``t`` moved by (dy, dx) and ``s``, over the centre that excludes an ``r`` px border."""
    h, w = t.shape
    return int(cv2.countNonZero(cv2.bitwise_xor(t[r - dy : h - r - dy, r - dx : w - r - dx], s[r : h - r, r : w - r])))


def _profile_shift(a: np.ndarray, b: np.ndarray, r: int) -> int:
    """The d in [-r, r] that minimises sum |a[i - d] - b[i]| over the centre (smallest |d| on ties)."""
    n = a.size
    costs = [(float(np.abs(a[r - d : n - r - d] - b[r : n - r]).sum()), abs(d), d) for d in range(-r, r + 1)]
    return min(costs)[2]


def _estimate_shift(t: np.ndarray, s: np.ndarray, max_shift: int) -> tuple[int, int]:
    h, w = t.shape
    r = min(max_shift, (h - 1) // 4, (w - 1) // 4)
    if r <= 0:
        return 0, 0
    rows = [cv2.reduce(x, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel() for x in (t, s)]
    cols = [cv2.reduce(x, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel() for x in (t, s)]
    best = (_profile_shift(rows[0], rows[1], r), _profile_shift(cols[0], cols[1], r))
    costs: dict[tuple[int, int], int] = {}

    def cost(p: tuple[int, int]) -> tuple[int, int]:
        if p not in costs:
            costs[p] = _xor_count(t, s, p[0], p[1], r)
        return costs[p], abs(p[0]) + abs(p[1])

    for _ in range(2 * r):  # descend on the XOR count from the profile estimate (usually 1-2 steps)
        around = [(best[0] + a, best[1] + b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
        step = min((p for p in around if abs(p[0]) <= r and abs(p[1]) <= r), key=cost)
        if step == best:
            break
        best = step
    return best if cost(best)[0] < cost((0, 0))[0] else (0, 0)


def estimate_shift(template: np.ndarray, tested: np.ndarray, *, max_shift: int = MAX_SHIFT) -> tuple[int, int]:
    """Integer translation ``(dy, dx)``, each within ``max_shift``, that best registers the template onto the tested
    image: ``template[y - dy, x - dx]`` matches ``tested[y, x]``.

    Row and column profiles of the binarized images give a first estimate; a descent on the count of differing
    pixels refines it. ``(0, 0)`` unless a shift strictly lowers that count (a blank template never moves).
    """
    _check_pair(template, tested)
    return _estimate_shift(_binarize(template), _binarize(tested), max_shift)


def _moved(img: np.ndarray, dy: int, dx: int, fill: np.ndarray) -> np.ndarray:
    """``img`` moved by (dy, dx); the band it uncovers is taken from ``fill``."""
    if dy == 0 and dx == 0:
        return img
    h, w = img.shape
    out = fill.copy()
    y0, y1, x0, x1 = max(dy, 0), h + min(dy, 0), max(dx, 0), w + min(dx, 0)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = img[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return out


def align_template(
    template: np.ndarray, tested: np.ndarray, *, max_shift: int = MAX_SHIFT
) -> tuple[np.ndarray, tuple[int, int]]:
    """The template moved onto the tested image by :func:`estimate_shift`, and the shift.

    The band the move uncovers is copied from the tested image, so it shows no difference. Crop with the aligned
    template (and call :func:`find_candidates` with ``align=False``) so the classifier sees what the candidate step saw.
    """
    dy, dx = estimate_shift(template, tested, max_shift=max_shift)
    return _moved(template, dy, dx, tested), (dy, dx)


def _raw_difference(t: np.ndarray, s: np.ndarray, threshold: int, tolerance: int = 0) -> np.ndarray:
    """0/1 mask of differing pixels, before any cleanup."""
    if tolerance > 0:  # position tolerance: a pixel differs only if the template has no such pixel within reach
        reach = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
        extra = cv2.bitwise_and(s, cv2.bitwise_not(cv2.dilate(t, reach)))
        missing = cv2.bitwise_and(cv2.bitwise_not(s), cv2.erode(t, reach))
        diff: np.ndarray = cv2.bitwise_or(extra, missing)
        cv2.threshold(diff, 0, 1, cv2.THRESH_BINARY, dst=diff)
    else:
        diff = cv2.absdiff(t, s)
        cv2.threshold(diff, threshold, 1, cv2.THRESH_BINARY, dst=diff)
    return diff


def _opened(raw: np.ndarray) -> np.ndarray:
    """The cleanup of a raw difference (a new array: ``raw`` is left as it is)."""
    return cv2.morphologyEx(raw, cv2.MORPH_OPEN, _CLEANUP) if CLEANUP_KERNEL > 1 else raw.copy()


def _cleaned_difference(t: np.ndarray, s: np.ndarray, threshold: int, tolerance: int = 0) -> np.ndarray:
    return _opened(_raw_difference(t, s, threshold, tolerance))


def difference_mask(
    template: np.ndarray,
    tested: np.ndarray,
    *,
    threshold: int = 64,
    shift: tuple[int, int] = (0, 0),
    tolerance: int = 0,
) -> np.ndarray:
    """Binary (0/1 uint8) mask of pixels where the re-binarized images differ by more than ``threshold``, after the
    template is moved by ``shift`` (``(dy, dx)``, see :func:`estimate_shift`) and a 3x3 cross opening removes 1-2 px
    slivers (edge misregistration, JPEG ringing).

    With ``tolerance`` r > 0 the comparison has a position tolerance (as in an AOI machine): a tested copper pixel
    differs only if no template copper lies within r px (a (2r+1)-square), a tested background pixel only if no
    template background does. Local misregistration of up to r px then leaves no difference at all.
    """
    _check_pair(template, tested)
    t, s = _binarize(template), _binarize(tested)
    return _cleaned_difference(_moved(t, shift[0], shift[1], s), s, threshold, tolerance)


_EMPTY = np.zeros(0, np.int64)


def _labels(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels; 16-bit when they fit (half the memory to touch), else 32-bit."""
    try:
        return cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_16U)[1]
    except cv2.error:
        return cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)[1]


def _grouped_pixels(mask: np.ndarray, min_area: int, merge_distance: int) -> tuple[np.ndarray, ...]:
    """Pixels ``(xs, ys)`` of the 8-connected blobs of ``mask`` with at least ``min_area`` pixels, sorted by merged
    group, and each group's start index. ``mask`` (0/1 uint8) may be modified."""
    pts = cv2.findNonZero(mask)
    if pts is None:
        return _EMPTY, _EMPTY, _EMPTY
    pts = pts.reshape(-1, 2).astype(np.int64)
    xs, ys = pts[:, 0], pts[:, 1]
    labels = None
    if min_area > 1:
        labels = _labels(mask)
        lab = labels[ys, xs]
        small = np.bincount(lab)[lab] < min_area
        if small.any():
            mask[ys[small], xs[small]] = 0  # whole blobs go, so the other blobs keep their labels
            xs, ys = xs[~small], ys[~small]
            if xs.size == 0:
                return _EMPTY, _EMPTY, _EMPTY
    if merge_distance > 0:
        k = merge_distance + 1
        groups = _labels(cv2.dilate(mask, np.ones((k, k), np.uint8)))
    else:
        groups = labels if labels is not None else _labels(mask)
    g = groups[ys, xs]
    order = np.argsort(g, kind="stable")
    g, xs, ys = g[order], xs[order], ys[order]
    return xs, ys, np.flatnonzero(np.r_[True, g[1:] != g[:-1]])


def _group_boxes(xs: np.ndarray, ys: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(n, 5) int64 rows ``x1, y1, x2, y2, area``: tight inclusive box and pixel count of each group."""
    if starts.size == 0:
        return np.zeros((0, 5), np.int64)
    return np.stack(
        [
            np.minimum.reduceat(xs, starts),
            np.minimum.reduceat(ys, starts),
            np.maximum.reduceat(xs, starts),
            np.maximum.reduceat(ys, starts),
            np.diff(np.r_[starts, xs.size]),
        ],
        axis=1,
    )


def _split_group(xs: np.ndarray, ys: np.ndarray, box: np.ndarray, min_area: int, merge_distance: int) -> np.ndarray:
    """Re-open one group's pixels with a 5x5 square (thin misregistration strips vanish, compact defects stay) and
    return the surviving groups' rows (empty when nothing survives)."""
    p = SPLIT_KERNEL
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    roi = np.zeros((y2 - y1 + 1 + 2 * p, x2 - x1 + 1 + 2 * p), np.uint8)
    roi[ys - y1 + p, xs - x1 + p] = 1
    opened: np.ndarray = cv2.morphologyEx(roi, cv2.MORPH_OPEN, _SPLIT)
    rows = _group_boxes(*_grouped_pixels(opened, min_area, merge_distance))
    rows[:, [0, 2]] += x1 - p
    rows[:, [1, 3]] += y1 - p
    return rows


def _candidate_rows(raw: np.ndarray, min_area: int, merge_distance: int, split_side: int) -> np.ndarray:
    """Tight ``x1, y1, x2, y2, area`` rows of the merged (and, where too long, split) blobs of one raw difference,
    cleaned."""
    xs, ys, starts = _grouped_pixels(_opened(raw), min_area, merge_distance)
    rows = _group_boxes(xs, ys, starts)
    if split_side > 0 and rows.size:
        big = np.flatnonzero(np.maximum(rows[:, 2] - rows[:, 0], rows[:, 3] - rows[:, 1]) + 1 > split_side)
        if big.size:
            ends = np.r_[starts[1:], xs.size]
            parts = [rows[np.setdiff1d(np.arange(len(rows)), big)]]
            for k in big:
                sub = _split_group(xs[starts[k] : ends[k]], ys[starts[k] : ends[k]], rows[k], min_area, merge_distance)
                parts.append(sub if sub.size else rows[k : k + 1])
            rows = np.concatenate(parts)
    return rows


def _apart(rows: np.ndarray, others: np.ndarray, pad: int) -> np.ndarray:
    """Boolean mask of the ``rows`` whose box, padded by ``pad``, overlaps no padded box of ``others``."""
    if not others.size:
        return np.ones(len(rows), bool)
    a, b = rows[:, None, :4], others[None, :, :4]
    gap = 2 * pad
    overlap = ((a[..., 0] <= b[..., 2] + gap) & (b[..., 0] <= a[..., 2] + gap)
               & (a[..., 1] <= b[..., 3] + gap) & (b[..., 1] <= a[..., 3] + gap))
    return np.asarray(~overlap.any(axis=1))


def _blob_rows(raw: np.ndarray, min_area: int, min_side: int, max_side: int) -> np.ndarray:
    """Tight ``x1, y1, x2, y2, area`` rows of the 8-connected blobs of the *uncleaned* difference with at least
    ``min_area`` pixels and a longer side in ``[min_side, max_side]``."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    st = stats[1:].astype(np.int64)
    side = np.maximum(st[:, 2], st[:, 3])
    st = st[(st[:, 4] >= min_area) & (side >= min_side) & (side <= max_side)]
    return np.stack([st[:, 0], st[:, 1], st[:, 0] + st[:, 2] - 1, st[:, 1] + st[:, 3] - 1, st[:, 4]], axis=1)


def _closed_rows(raw: np.ndarray, min_area: int, merge_distance: int) -> np.ndarray:
    """Tight ``x1, y1, x2, y2, area`` rows of the merged blobs of the difference *closed* with a 3x3 square before the
    cleanup opening: the closing joins a dithered or broken 1-2 px line into a solid stroke the opening keeps."""
    closed = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, _CLOSING)
    return _group_boxes(*_grouped_pixels(_opened(closed), min_area, merge_distance))


def _max_iou(rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per row of ``rows``: the largest IoU of its inclusive pixel box with a box of ``others`` (0 without any)."""
    if not len(others):
        return np.zeros(len(rows))
    a, b = rows[:, None, :4], others[None, :, :4]
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return np.asarray((inter / (area_a + area_b - inter)).max(axis=1))


def find_candidates(template: np.ndarray, tested: np.ndarray, cfg: CandidateConfig | None = None,
                    **overrides: Any) -> list[Candidate]:
    """Difference blobs between two grayscale images, sorted by (y1, x1).

    Parameters come from ``cfg`` (a :class:`CandidateConfig`, default: its defaults, the only defaults there are)
    with ``overrides`` (field names of :data:`CANDIDATE_PARAMS`) on top: ``find_candidates(t, s, pad=0)``.

    With ``align`` the template is first registered onto the tested image (:func:`estimate_shift`, shifts up to
    ``max_shift`` px). Blobs smaller than ``min_area`` pixels are dropped; blobs separated by at most
    ``merge_distance`` pixels are merged into one candidate; a merged group with a side longer than ``split_side``
    pixels (``<= 0``: never) is re-opened with a 5x5 square and replaced by what survives, if anything; boxes are padded
    by ``pad`` and clipped to the image. When more than ``max_candidates`` remain, the largest ones (by area) are kept.

    ``tolerance`` > 0 compares with that position tolerance (:func:`difference_mask`): residual local misregistration
    no longer fuses with a defect nearby into one oversized box. It also erases defects thinner than the tolerance
    (hairline shorts and opens), so ``exact_min_area`` > 0 adds a second pass on the exact difference whose blobs of at
    least that many pixels are kept where they touch no candidate of the first pass.

    ``close_min_area`` > 0 adds a closed-difference pass: the difference is closed with a 3x3 square before the
    cleanup opening, which joins the dots of a dithered or broken thin line (an open or short drawn as a speckled
    stroke) into one the opening keeps; its merged blobs of at least that many pixels are added where no candidate box
    overlaps them by IoU ``close_max_iou`` or more.

    ``blob_min_area`` > 0 adds whole-blob hypotheses: the blobs of the difference *before* the cleanup opening with at
    least that many pixels and a longer side of ``blob_min_side`` to ``blob_max_side`` px, each where no candidate box
    overlaps it by IoU ``blob_max_iou`` or more. A long scratch 2 px wide that the opening breaks into fragments, each
    too small to match its defect, is one such blob; the classifier decides whether it is a defect, and the detector
    merges it with its fragments of the same type.
    """
    c = candidate_settings(cfg, **overrides)
    threshold, min_area, pad, merge_distance = c.threshold, c.min_area, c.pad, c.merge_distance
    max_candidates, align, max_shift, split_side, tolerance = (c.max_candidates, c.align, c.max_shift, c.split_side,
                                                               c.tolerance)
    exact_min_area, close_min_area, close_max_iou = c.exact_min_area, c.close_min_area, c.close_max_iou
    blob_min_area, blob_min_side, blob_max_side, blob_max_iou = (c.blob_min_area, c.blob_min_side, c.blob_max_side,
                                                                 c.blob_max_iou)
    if max_candidates <= 0:
        return []
    _check_pair(template, tested)
    t, s = _binarize(template), _binarize(tested)
    if align:
        dy, dx = _estimate_shift(t, s, max_shift)
        t = _moved(t, dy, dx, s)
    raw = _raw_difference(t, s, threshold, tolerance)  # shared by the first, closed and blob passes, never modified
    rows = _candidate_rows(raw, min_area, merge_distance, split_side)
    if tolerance > 0 and exact_min_area > 0:
        exact = _candidate_rows(_raw_difference(t, s, threshold, 0), exact_min_area, merge_distance, split_side)
        rows = np.concatenate([rows, exact[_apart(exact, rows, pad)]])
    if close_min_area > 0:
        closed = _closed_rows(raw, close_min_area, merge_distance)
        rows = np.concatenate([rows, closed[_max_iou(closed, rows) < close_max_iou]])
    if blob_min_area > 0:
        blobs = _blob_rows(raw, blob_min_area, blob_min_side, blob_max_side)
        rows = np.concatenate([rows, blobs[_max_iou(blobs, rows) < blob_max_iou]])
    h, w = s.shape
    cands = [
        Candidate(
            max(int(a) - pad, 0), max(int(b) - pad, 0), min(int(c) + pad, w - 1), min(int(d) + pad, h - 1), int(e)
        )
        for a, b, c, d, e in rows
    ]
    if len(cands) > max_candidates:
        cands = sorted(cands, key=lambda c: (-c.area, c.y1, c.x1))[:max_candidates]
    return sorted(cands, key=lambda c: (c.y1, c.x1, c.y2, c.x2))


def candidate_settings(cfg: CandidateConfig | None = None, **overrides: Any) -> CandidateConfig:
    """``cfg`` (default: :class:`CandidateConfig`'s defaults) with ``overrides``; ValueError names an unknown field."""
    unknown = set(overrides) - set(CANDIDATE_PARAMS)
    if unknown:
        raise ValueError(f"unknown candidate parameter(s) {', '.join(sorted(unknown))}: use "
                         f"{', '.join(CANDIDATE_PARAMS)}")
    return replace(cfg or CandidateConfig(), **overrides)


def detection_box(
    c: Candidate, grow: int = DETECTION_GROW, shape: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    """The box to report for a candidate under DeepPCB's loose-box convention: the candidate box grown by ``grow`` px
    on each side and clipped to the image (``shape`` = (height, width); without it only at 0).

    DeepPCB ground truth is the defect's tight box plus a margin of about 10 px on each side (median 10-11 px on the
    train part); with the default ``pad`` of 4 the default ``grow`` of 6 gives the blob's tight box plus 10 px, which
    maximised the fraction of ground-truth boxes met at IoU > 0.33 (``benchmarks/deeppcb_candidates.py``). Because the
    grow exceeds the pad, clipping the candidate box at the border loses nothing here.
    """
    x1, y1, x2, y2 = c.x1 - grow, c.y1 - grow, c.x2 + grow, c.y2 + grow
    if shape is not None:
        x2, y2 = min(x2, shape[1] - 1), min(y2, shape[0] - 1)
    return max(x1, 0), max(y1, 0), x2, y2


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
