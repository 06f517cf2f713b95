"""Seeded synthetic PCB boards in DeepPCB format: a defect-free template, a tested image and exact defect boxes.

Why: real DeepPCB has 1,000 annotated pairs, too few to train and gate models on, and no record of the harmless
differences an AOI machine flags. This module draws realistic copper (octilinear traces, SMD and through-hole pads,
vias, pours with clearance), then draws the six DeepPCB defect types where they physically occur, plus deliberate
non-defect differences ("nuisance": edge jitter, pad misregistration, dust, over/under-etch) that become the
`false_call` class downstream.
Everything is a pure function of a numpy Generator, so a seed reproduces byte-identical datasets.

Polarity and scale follow the real data: copper is black (0) on white laminate (255); features are drawn at DeepPCB's
640 px scale (traces 5-28 px wide, defects roughly 5-25 px), so a smaller board is a smaller window, not a zoom-out.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from defectops.core.taxonomy import DEFECT_TYPES, NUISANCE_LABEL, Box

COPPER_VALUE = 0  # DeepPCB: copper is black
LAMINATE_VALUE = 255
BOX_MARGIN: tuple[int, int] = (8, 14)  # per-side margin around the changed pixels, like DeepPCB (median ~10 px)
NUISANCE_MARGIN = 2
BOX_GAP = 3  # minimum free pixels between any two recorded boxes
MIN_DEFECT_CORE = 3  # every defect changes at least one solid 3x3 block (DeepPCB's smallest defects are ~10 px)
JPEG_QUALITY = 95
PAIRS_PER_GROUP = 1000  # stems are GGGGGIII: 3 digits of index per group
MIN_SIZE = 128
_REF_AREA = 640.0 * 640.0

Point = tuple[float, float]
IntBox = tuple[int, int, int, int]


@dataclass
class BoardPair:
    """One aligned template/tested pair with its defect boxes and the boxes of deliberate non-defect differences."""

    template: np.ndarray
    tested: np.ndarray
    boxes: list[Box]
    nuisance: list[Box]


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------------

_DIRS: tuple[tuple[int, int], ...] = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))


@dataclass(frozen=True)
class _Shape:
    """A copper primitive: ``circle`` (pts[0], radius=size), ``rect`` (pts[0]-pts[1] corners) or ``line``
    (polyline pts, thickness=size)."""

    kind: str
    pts: tuple[tuple[int, int], ...]
    size: int

    def bbox(self, grow: int) -> IntBox:
        xs = [p[0] for p in self.pts]
        ys = [p[1] for p in self.pts]
        extra = grow + (self.size if self.kind == "circle" else self.size // 2 + 1 if self.kind == "line" else 0)
        return min(xs) - extra, min(ys) - extra, max(xs) + extra, max(ys) + extra

    def draw(self, img: np.ndarray, origin: tuple[int, int], value: int, grow: int = 0) -> None:
        ox, oy = origin
        pts = [(x - ox, y - oy) for x, y in self.pts]
        if self.kind == "circle":
            cv2.circle(img, pts[0], self.size + grow, value, -1, cv2.LINE_8)
        elif self.kind == "rect":
            (ax, ay), (bx, by) = pts
            cv2.rectangle(img, (ax - grow, ay - grow), (bx + grow, by + grow), value, -1)
        else:
            arr = np.array(pts, dtype=np.int32).reshape(-1, 1, 2)
            cv2.polylines(img, [arr], False, value, self.size + 2 * grow, cv2.LINE_8)


@dataclass(frozen=True)
class _Segment:
    """One straight piece of a drawn trace, used to place trace defects and edge nuisances."""

    p0: Point
    p1: Point
    width: int

    @property
    def length(self) -> float:
        return math.hypot(self.p1[0] - self.p0[0], self.p1[1] - self.p0[1])


@dataclass(frozen=True)
class _Terminal:
    x: int
    y: int
    size: int  # smallest half-extent of the pad, caps the width of traces leaving it
    net: int


def _clip_box(box: IntBox, size: int) -> IntBox | None:
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], size - 1), min(box[3], size - 1)
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def _boxes_touch(a: IntBox, b: IntBox, gap: int) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _ipt(p: Point) -> tuple[int, int]:
    return round(p[0]), round(p[1])


def _add(p: Point, v: Point, k: float = 1.0) -> Point:
    return p[0] + v[0] * k, p[1] + v[1] * k


def _rot(v: Point, angle: float) -> Point:
    c, s = math.cos(angle), math.sin(angle)
    return v[0] * c - v[1] * s, v[0] * s + v[1] * c


# ----------------------------------------------------------------------------------------------------------------
# Template
# ----------------------------------------------------------------------------------------------------------------


class _Layout:
    """Mutable state while drawing a template: copper mask, per-pixel net ids (for spacing checks), trace segments."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size
        self.copper = np.zeros((size, size), np.uint8)
        self.owner = np.zeros((size, size), np.int32)
        self.clearance = int(rng.integers(6, 11))
        self.segments: list[_Segment] = []
        self.terminals: list[_Terminal] = []
        self.holes: list[tuple[int, int, int]] = []
        self.next_net = 1

    def new_net(self) -> int:
        self.next_net += 1
        return self.next_net - 1

    def _roi(self, shapes: list[_Shape], grow: int) -> IntBox | None:
        boxes = [s.bbox(grow) for s in shapes]
        union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        return _clip_box(union, self.size)

    def fits(self, shapes: list[_Shape], allowed: tuple[int, ...] = ()) -> bool:
        """True when the shapes, grown by the clearance, touch no copper except nets in ``allowed``."""
        roi = self._roi(shapes, self.clearance)
        if roi is None:
            return False
        x1, y1, x2, y2 = roi
        scratch = np.zeros((y2 - y1 + 1, x2 - x1 + 1), np.uint8)
        for s in shapes:
            s.draw(scratch, (x1, y1), 1, self.clearance)
        hit = self.owner[y1 : y2 + 1, x1 : x2 + 1][scratch > 0]
        hit = hit[hit > 0]
        if hit.size == 0:
            return True
        return bool(np.isin(hit, np.array(allowed, dtype=np.int32)).all()) if allowed else False

    def commit(self, shapes: list[_Shape], net: int) -> None:
        roi = self._roi(shapes, 0)
        if roi is None:
            return
        x1, y1, x2, y2 = roi
        scratch = np.zeros((y2 - y1 + 1, x2 - x1 + 1), np.uint8)
        for s in shapes:
            s.draw(scratch, (x1, y1), 1, 0)
        on = scratch > 0
        self.copper[y1 : y2 + 1, x1 : x2 + 1][on] = 1
        self.owner[y1 : y2 + 1, x1 : x2 + 1][on] = net

    def add_trace(self, pts: list[tuple[int, int]], width: int, allowed: tuple[int, ...], net: int) -> bool:
        clean = [pts[0]]
        for p in pts[1:]:
            if p != clean[-1]:
                clean.append(p)
        if len(clean) < 2:
            return False
        shape = _Shape("line", tuple(clean), width)
        if not self.fits([shape], allowed):
            return False
        self.commit([shape], net)
        for a, b in itertools.pairwise(clean):
            self.segments.append(_Segment((float(a[0]), float(a[1])), (float(b[0]), float(b[1])), width))
        return True


def _pad_shapes(rng: np.random.Generator, kind: str, x: int, y: int) -> tuple[list[_Shape], int, int]:
    """Shapes of one pad at (x, y); returns (shapes, hole radius or 0, half-extent for trace width)."""
    if kind == "smd":
        hw, hh = int(rng.integers(6, 20)), int(rng.integers(6, 20))
        return [_Shape("rect", ((x - hw, y - hh), (x + hw, y + hh)), 0)], 0, min(hw, hh)
    if kind == "oblong":
        r = int(rng.integers(7, 13))
        half = int(rng.integers(r, 2 * r + 1))
        ends = ((x - half, y), (x + half, y)) if rng.random() < 0.5 else ((x, y - half), (x, y + half))
        hole = int(rng.integers(3, max(4, r // 2 + 1))) if rng.random() < 0.5 else 0
        return [_Shape("line", ends, 2 * r)], hole, r
    if kind == "tht":
        r = int(rng.integers(10, 23))
        hole = int(rng.integers(3, max(4, r // 2 + 1)))
        return [_Shape("circle", ((x, y),), r)], hole, r
    r = int(rng.integers(7, 13))  # via
    hole = int(rng.integers(3, r - 3))
    return [_Shape("circle", ((x, y),), r)], hole, r


def _trace_width(rng: np.random.Generator, cap: int) -> int:
    choices = [w for w in (5, 6, 8, 10, 12, 14, 16, 20, 24, 28) if w <= max(5, cap)]
    weights = np.array([1.0 / (1 + 0.3 * i) for i in range(len(choices))])
    return int(choices[int(rng.choice(len(choices), p=weights / weights.sum()))])


def _place_pads(lay: _Layout, count: int) -> None:
    rng, size = lay.rng, lay.size
    kinds = ("smd", "tht", "via", "oblong")
    placed = 0
    for _ in range(count * 6):
        if placed >= count:
            break
        kind = kinds[int(rng.choice(4, p=[0.35, 0.25, 0.3, 0.1]))]
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        shapes, hole, half = _pad_shapes(rng, kind, x, y)
        if not lay.fits(shapes):
            continue
        net = lay.new_net()
        lay.commit(shapes, net)
        if hole:
            lay.holes.append((x, y, hole))
        lay.terminals.append(_Terminal(x, y, half, net))
        placed += 1


def _place_pad_row(lay: _Layout) -> None:
    """A row of rectangular SMD pads (IC side) with parallel fan-out traces: the bus look of real boards."""
    rng, size = lay.rng, lay.size
    n = int(rng.integers(3, 9))
    pw, ph = int(rng.integers(4, 8)), int(rng.integers(10, 19))
    pitch = 2 * pw + lay.clearance + int(rng.integers(1, 9))
    horizontal = rng.random() < 0.5
    x0, y0 = int(rng.integers(0, size)), int(rng.integers(0, size))
    out = 1 if rng.random() < 0.5 else -1
    turn = int(rng.choice([-1, 0, 1]))
    first = int(rng.integers(ph + 10, ph + 60))
    second = int(rng.integers(40, 220))
    width = min(_trace_width(rng, 2 * pw - 2), 2 * pw)
    for i in range(n):
        if horizontal:
            cx, cy = x0 + i * pitch, y0
            pad = _Shape("rect", ((cx - pw, cy - ph), (cx + pw, cy + ph)), 0)
            d0 = (0, out)
        else:
            cx, cy = x0, y0 + i * pitch
            pad = _Shape("rect", ((cx - ph, cy - pw), (cx + ph, cy + pw)), 0)
            d0 = (out, 0)
        if not lay.fits([pad]):
            continue
        net = lay.new_net()
        lay.commit([pad], net)
        lay.terminals.append(_Terminal(cx, cy, pw, net))
        # parallel fan-out: same first leg, 45-degree turn, staggered so traces keep their pitch
        k = _DIRS.index(d0)
        d1 = _DIRS[(k + turn) % 8]
        stagger = (i if turn * out > 0 else n - 1 - i) * pitch if turn else 0
        a = (cx, cy)
        b = (cx + d0[0] * (first + stagger // 2), cy + d0[1] * (first + stagger // 2))
        c = (b[0] + d1[0] * second, b[1] + d1[1] * second)
        lay.add_trace([a, b, c], width, (net,), net)


def _octilinear(a: tuple[int, int], b: tuple[int, int], diagonal_first: bool) -> list[tuple[int, int]]:
    dx, dy = b[0] - a[0], b[1] - a[1]
    diag = min(abs(dx), abs(dy))
    sx, sy = int(np.sign(dx)), int(np.sign(dy))
    if diagonal_first:
        mid = (a[0] + sx * diag, a[1] + sy * diag)
    elif abs(dx) > abs(dy):
        mid = (a[0] + sx * (abs(dx) - diag), a[1])
    else:
        mid = (a[0], a[1] + sy * (abs(dy) - diag))
    return [a, mid, b]


def _route_pairs(lay: _Layout) -> None:
    rng = lay.rng
    terms = list(lay.terminals)
    order = rng.permutation(len(terms))
    for i in order:
        if rng.random() > 0.7:
            continue
        a = terms[int(i)]
        dists = [(math.hypot(t.x - a.x, t.y - a.y), j) for j, t in enumerate(terms) if t.net != a.net]
        near = [j for d, j in sorted(dists) if 30 < d < 260][:3]
        if not near:
            continue
        b = terms[near[int(rng.integers(len(near)))]]
        width = _trace_width(rng, 2 * min(a.size, b.size) - 2)
        first = rng.random() < 0.5
        for diagonal_first in (first, not first):
            if lay.add_trace(_octilinear((a.x, a.y), (b.x, b.y), diagonal_first), width, (a.net, b.net), a.net):
                break


def _random_walk(lay: _Layout, start: tuple[int, int], direction: int, legs: int) -> list[tuple[int, int]]:
    rng = lay.rng
    pts = [start]
    k = direction
    for leg in range(legs):
        if leg:
            k = (k + int(rng.choice([-1, 1, -2, 2], p=[0.4, 0.4, 0.1, 0.1]))) % 8
        length = int(rng.integers(25, 200))
        d = _DIRS[k]
        last = pts[-1]
        pts.append((last[0] + d[0] * length, last[1] + d[1] * length))
    return pts


def _place_stubs(lay: _Layout, count: int) -> None:
    """Traces leaving pads (or starting off-board) in a 45-degree random walk, sometimes ending on a via or pad,
    sometimes duplicated at a fixed pitch (a bus)."""
    rng, size = lay.rng, lay.size
    for _ in range(count):
        if lay.terminals and rng.random() < 0.6:
            t = lay.terminals[int(rng.integers(len(lay.terminals)))]
            start, net, cap = (t.x, t.y), t.net, 2 * t.size - 2
        else:
            start = (int(rng.integers(-20, size + 20)), int(rng.integers(-20, size + 20)))
            net, cap = lay.new_net(), 24
        width = _trace_width(rng, cap)
        pts = _random_walk(lay, start, int(rng.integers(8)), int(rng.integers(1, 4)))
        if not lay.add_trace(pts, width, (net,), net):
            continue
        end = pts[-1]
        if 0 <= end[0] < size and 0 <= end[1] < size and rng.random() < 0.6:
            kind = "via" if rng.random() < 0.6 else "tht"
            shapes, hole, half = _pad_shapes(rng, kind, end[0], end[1])
            if lay.fits(shapes, (net,)):
                lay.commit(shapes, net)
                if hole:
                    lay.holes.append((end[0], end[1], hole))
                lay.terminals.append(_Terminal(end[0], end[1], half, net))
        if rng.random() < 0.3:  # bus: parallel copies shifted across the first leg
            d = (pts[1][0] - pts[0][0], pts[1][1] - pts[0][1])
            norm = math.hypot(*d) or 1.0
            nx, ny = -d[1] / norm, d[0] / norm
            pitch = width + lay.clearance + int(rng.integers(2, 8))
            for j in range(1, int(rng.integers(2, 5))):
                off = (round(nx * pitch * j), round(ny * pitch * j))
                copy = [(p[0] + off[0], p[1] + off[1]) for p in pts]
                lay.add_trace(copy, width, (), lay.new_net())


def _place_pours(lay: _Layout, count: int) -> None:
    """Filled copper areas with chamfered corners, carved around existing copper by the clearance."""
    rng, size = lay.rng, lay.size
    for _ in range(count):
        w = int(rng.uniform(0.25, 0.75) * size)
        h = int(rng.uniform(0.25, 0.75) * size)
        x0 = int(rng.integers(-w // 3, size - 2 * w // 3))
        y0 = int(rng.integers(-h // 3, size - 2 * h // 3))
        ch = [int(rng.uniform(0, 0.35) * min(w, h)) for _ in range(4)]
        poly = np.array(
            [
                (x0 + ch[0], y0),
                (x0 + w - ch[1], y0),
                (x0 + w, y0 + ch[1]),
                (x0 + w, y0 + h - ch[2]),
                (x0 + w - ch[2], y0 + h),
                (x0 + ch[3], y0 + h),
                (x0, y0 + h - ch[3]),
                (x0, y0 + ch[0]),
            ],
            dtype=np.int32,
        )
        pour: np.ndarray = np.zeros((size, size), np.uint8)
        cv2.fillPoly(pour, [poly], 1)
        c = lay.clearance
        keep_out = cv2.dilate(lay.copper, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * c + 1, 2 * c + 1)))
        pour[keep_out > 0] = 0
        pour = cv2.morphologyEx(pour, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (c + 1, c + 1)))
        on = pour > 0
        lay.copper[on] = 1
        lay.owner[on] = lay.new_net()


def _poisson_at_least(rng: np.random.Generator, mean: float, low: int) -> int:
    return max(low, int(rng.poisson(mean)))


def _draw_template(rng: np.random.Generator, size: int) -> _Layout:
    lay = _Layout(rng, size)
    scale = size * size / _REF_AREA
    for _ in range(_poisson_at_least(rng, 2.0 * scale, 0)):
        _place_pad_row(lay)
    _place_pads(lay, _poisson_at_least(rng, 18 * scale, 1))
    _route_pairs(lay)
    _place_stubs(lay, _poisson_at_least(rng, 20 * scale, 2))
    if rng.random() < 0.55:
        _place_pours(lay, int(rng.integers(1, 3)))
    for x, y, r in lay.holes:
        cv2.circle(lay.copper, (x, y), r, 0, -1, cv2.LINE_8)
    return lay


# ----------------------------------------------------------------------------------------------------------------
# Defects and nuisances: proposals edit a small window of the tested copper mask
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Edit:
    x0: int
    y0: int
    patch: np.ndarray  # new copper mask (0/1) for the window starting at (x0, y0)


class _Editor:
    """Holds the template analysis (labels, distance maps) and the tested mask being edited."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.rng = rng
        self.size = lay.size
        self.template = lay.copper
        self.tested = lay.copper.copy()
        _, labels = cv2.connectedComponents(lay.copper, connectivity=8)
        self.labels = labels.astype(np.int32)
        padded_cu = cv2.copyMakeBorder(lay.copper, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
        self.dist_cu = cv2.distanceTransform(padded_cu, cv2.DIST_L2, 3)[1:-1, 1:-1]
        padded_bg = cv2.copyMakeBorder(1 - lay.copper, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
        self.dist_bg = cv2.distanceTransform(padded_bg, cv2.DIST_L2, 3)[1:-1, 1:-1]
        segs = [s for s in lay.segments if s.length >= 2 * s.width + 12]
        self.segments = segs
        self.seg_weights = np.array([s.length for s in segs], dtype=np.float64)
        self.terminals = lay.terminals
        self.taken: list[IntBox] = []

    # -- sampling ------------------------------------------------------------------------------------------------

    def inside(self, p: Point, border: int = 0) -> bool:
        return border <= p[0] < self.size - border and border <= p[1] < self.size - border

    def is_copper(self, p: Point) -> bool:
        x, y = _ipt(p)
        return self.inside((x, y)) and bool(self.template[y, x])

    def is_laminate(self, p: Point) -> bool:
        x, y = _ipt(p)
        return self.inside((x, y)) and not self.template[y, x]

    def trace_point(self, min_width: int) -> tuple[_Segment, Point, Point, Point] | None:
        """A point in the middle of a free-standing trace: (segment, point, unit direction, unit normal)."""
        if not self.segments:
            return None
        w = self.seg_weights * np.array([s.width >= min_width for s in self.segments], dtype=np.float64)
        if w.sum() <= 0:
            return None
        seg = self.segments[int(self.rng.choice(len(self.segments), p=w / w.sum()))]
        t = float(self.rng.uniform(0.2, 0.8))
        p = (seg.p0[0] + t * (seg.p1[0] - seg.p0[0]), seg.p0[1] + t * (seg.p1[1] - seg.p0[1]))
        ln = seg.length
        d = ((seg.p1[0] - seg.p0[0]) / ln, (seg.p1[1] - seg.p0[1]) / ln)
        n = (-d[1], d[0])
        half = seg.width / 2 + 3
        if not self.inside(p, seg.width + 8) or not self.is_copper(p):
            return None
        if not (self.is_laminate(_add(p, n, half)) and self.is_laminate(_add(p, n, -half))):
            return None
        return seg, p, d, n

    def window(self, pts: list[Point], pad: int) -> IntBox | None:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        box = (math.floor(min(xs)) - pad, math.floor(min(ys)) - pad, math.ceil(max(xs)) + pad, math.ceil(max(ys)) + pad)
        return _clip_box(box, self.size)

    def current(self, win: IntBox) -> np.ndarray:
        x1, y1, x2, y2 = win
        return self.tested[y1 : y2 + 1, x1 : x2 + 1].copy()

    def label_patch(self, win: IntBox) -> np.ndarray:
        x1, y1, x2, y2 = win
        return self.labels[y1 : y2 + 1, x1 : x2 + 1]

    @staticmethod
    def poly(patch: np.ndarray, win: IntBox, pts: list[Point], value: int) -> None:
        arr = np.array([(round(x - win[0]), round(y - win[1])) for x, y in pts], dtype=np.int32)
        cv2.fillPoly(patch, [arr], value, cv2.LINE_8)

    def touches_only(self, added: np.ndarray, win: IntBox, allowed: set[int], reach: int) -> bool:
        """True when copper within ``reach`` px of the added pixels belongs only to components in ``allowed``."""
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
        grown = cv2.dilate(added.astype(np.uint8), k) > 0
        labs = set(np.unique(self.label_patch(win)[grown]).tolist()) - {0}
        return labs <= allowed

    # -- commit ----------------------------------------------------------------------------------------------------

    def commit(self, edit: _Edit, label: str) -> Box | None:
        h, w = edit.patch.shape
        old = self.tested[edit.y0 : edit.y0 + h, edit.x0 : edit.x0 + w]
        changed = edit.patch != old
        if not changed.any():
            return None
        if label != NUISANCE_LABEL and not cv2.erode(changed.astype(np.uint8), _CORE_KERNEL).any():
            return None  # below AOI resolution: a defect changes at least one MIN_DEFECT_CORE-square block
        ys, xs = np.nonzero(changed)
        if label == NUISANCE_LABEL:
            m = [NUISANCE_MARGIN] * 4
        else:
            m = [int(v) for v in self.rng.integers(BOX_MARGIN[0], BOX_MARGIN[1] + 1, size=4)]
        raw = (
            edit.x0 + int(xs.min()) - m[0],
            edit.y0 + int(ys.min()) - m[1],
            edit.x0 + int(xs.max()) + m[2],
            edit.y0 + int(ys.max()) + m[3],
        )
        box = _clip_box(raw, self.size)
        if box is None or any(_boxes_touch(box, t, BOX_GAP) for t in self.taken):
            return None
        old[...] = edit.patch
        self.taken.append(box)
        return Box(box[0], box[1], box[2], box[3], label)

    # -- defects -----------------------------------------------------------------------------------------------------

    def open_(self) -> _Edit | None:
        hit = self.trace_point(5)
        if hit is None:
            return None
        seg, p, d, n = hit
        rng = self.rng
        gap = float(rng.uniform(4, 11))
        half = seg.width / 2 + 2
        skew = float(rng.uniform(-0.6, 0.6)) * half
        q_pos, q_neg = _add(_add(p, n, half), d, skew), _add(_add(p, n, -half), d, -skew)
        corners = [_add(q_pos, d, gap / 2), _add(q_pos, d, -gap / 2), _add(q_neg, d, -gap / 2), _add(q_neg, d, gap / 2)]
        corners = [(x + float(rng.uniform(-1.5, 1.5)), y + float(rng.uniform(-1.5, 1.5))) for x, y in corners]
        win = self.window(corners, 3)
        if win is None:
            return None
        cut = np.zeros((win[3] - win[1] + 1, win[2] - win[0] + 1), np.uint8)
        self.poly(cut, win, corners, 1)
        origin = int(self.labels[_ipt(p)[1], _ipt(p)[0]])
        if not self.touches_only(cut, win, {origin}, 1):
            return None
        patch = self.current(win)
        patch[cut > 0] = 0
        return _Edit(win[0], win[1], patch)

    def mousebite(self) -> _Edit | None:
        hit = self.trace_point(8)
        if hit is None:
            return None
        seg, p, d, n = hit
        rng = self.rng
        side = 1.0 if rng.random() < 0.5 else -1.0
        edge = _add(p, n, side * seg.width / 2)
        r_max = max(3, min(7, seg.width // 2 - 1))
        k = int(rng.integers(1, 4))
        radii = [int(rng.integers(3, r_max + 1)) for _ in range(k)]
        spacing = float(rng.uniform(1.0, 1.7)) * max(radii)
        centers = [
            _add(_add(edge, d, (j - (k - 1) / 2) * spacing), n, -side * float(rng.uniform(0.0, 2.0))) for j in range(k)
        ]
        win = self.window(centers, max(radii) + 6)
        if win is None:
            return None
        patch = self.current(win)
        bite = np.zeros_like(patch)
        for c, r in zip(centers, radii, strict=True):
            cv2.circle(bite, (round(c[0] - win[0]), round(c[1] - win[1])), r, 1, -1, cv2.LINE_8)
        origin = int(self.labels[_ipt(p)[1], _ipt(p)[0]])
        if not self.touches_only(bite, win, {origin}, 1):
            return None
        patch[bite > 0] = 0
        return _Edit(win[0], win[1], patch)

    def spur(self) -> _Edit | None:
        hit = self.trace_point(5)
        if hit is None:
            return None
        seg, p, _d, n = hit
        rng = self.rng
        side = 1.0 if rng.random() < 0.5 else -1.0
        base_pt = _add(p, n, side * (seg.width / 2 - 1))
        u = _rot((n[0] * side, n[1] * side), float(rng.uniform(-0.6, 0.6)))
        v = (-u[1], u[0])
        length = float(rng.uniform(5, 15))
        base, tip = float(rng.uniform(3, 7)), float(rng.uniform(2, 4))
        end = _add(base_pt, u, length)
        pts = [_add(base_pt, v, base / 2), _add(end, v, tip / 2), _add(end, v, -tip / 2), _add(base_pt, v, -base / 2)]
        win = self.window(pts, 8)
        if win is None or not self.inside(end, 2):
            return None
        patch = self.current(win)
        old = patch.copy()
        self.poly(patch, win, pts, 1)
        added = (patch > 0) & (old == 0)
        origin = int(self.labels[_ipt(p)[1], _ipt(p)[0]])
        if not added.any() or not self.touches_only(added, win, {origin}, 4):
            return None
        return _Edit(win[0], win[1], patch)

    def short(self) -> _Edit | None:
        hit = self.trace_point(5)
        if hit is None:
            return None
        seg, p, d, n = hit
        rng = self.rng
        side = 1.0 if rng.random() < 0.5 else -1.0
        u = (n[0] * side, n[1] * side)
        edge = _add(p, u, seg.width / 2)
        origin = int(self.labels[_ipt(p)[1], _ipt(p)[0]])
        target: Point | None = None
        other = 0
        for t in range(3, 36):
            q = _add(edge, u, t)
            if not self.inside(q):
                return None
            if self.is_copper(q):
                other = int(self.labels[_ipt(q)[1], _ipt(q)[0]])
                target = q
                break
        if target is None or other in (0, origin):
            return None
        start, stop = _add(edge, u, -2), _add(target, u, 2)
        mid = _add(((start[0] + stop[0]) / 2, (start[1] + stop[1]) / 2), d, float(rng.uniform(-3, 3)))
        thickness = int(rng.integers(3, 7))
        win = self.window([start, stop, mid], thickness + 5)
        if win is None:
            return None
        patch = self.current(win)
        old = patch.copy()
        line = np.array([_ipt((x - win[0], y - win[1])) for x, y in (start, mid, stop)], dtype=np.int32)
        cv2.polylines(patch, [line.reshape(-1, 1, 2)], False, 1, thickness, cv2.LINE_8)
        added = (patch > 0) & (old == 0)
        if not added.any() or not self.touches_only(added, win, {origin, other}, 2):
            return None
        return _Edit(win[0], win[1], patch)

    def copper(self) -> _Edit | None:
        rng = self.rng
        radius = float(rng.uniform(4, 10))
        for _ in range(20):
            c = (float(rng.uniform(0, self.size)), float(rng.uniform(0, self.size)))
            x, y = _ipt(c)
            if self.inside((x, y), int(radius) + 2) and self.dist_bg[y, x] >= radius + 6:
                break
        else:
            return None
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=k))
        radii = rng.uniform(0.65, 1.0, size=k) * radius
        pts = [
            (c[0] + float(r * math.cos(a)), c[1] + float(r * math.sin(a))) for a, r in zip(angles, radii, strict=True)
        ]
        win = self.window(pts, 3)
        if win is None:
            return None
        patch = self.current(win)
        self.poly(patch, win, pts, 1)
        return _Edit(win[0], win[1], patch)

    def pin_hole(self) -> _Edit | None:
        rng = self.rng
        r = float(rng.uniform(2, 7))
        for _ in range(20):
            c = (float(rng.uniform(0, self.size)), float(rng.uniform(0, self.size)))
            x, y = _ipt(c)
            if self.inside((x, y), int(r) + 2) and self.dist_cu[y, x] >= r + 3:
                break
        else:
            return None
        win = self.window([c], int(r) + 3)
        if win is None:
            return None
        patch = self.current(win)
        axes = (max(2, round(r)), max(2, round(r * float(rng.uniform(0.6, 1.0)))))
        center = (round(c[0] - win[0]), round(c[1] - win[1]))
        cv2.ellipse(patch, center, axes, float(rng.uniform(0, 180)), 0, 360, 0, -1, cv2.LINE_8)
        return _Edit(win[0], win[1], patch)

    # -- nuisances ---------------------------------------------------------------------------------------------------

    def _strip(self, p: Point, d: Point, n: Point, along: float, lo: float, hi: float) -> list[Point]:
        """Quadrilateral along direction d, centred on p, spanning normal offsets lo..hi."""
        a, b = _add(p, d, -along / 2), _add(p, d, along / 2)
        return [_add(a, n, lo), _add(b, n, lo), _add(b, n, hi), _add(a, n, hi)]

    def _amount(self) -> int:
        return int(self.rng.choice([1, 2, 3], p=[0.15, 0.35, 0.5]))

    def _edge_window(
        self, hit: tuple[_Segment, Point, Point, Point], lo: float, hi: float
    ) -> tuple[list[Point], IntBox] | None:
        _seg, p, d, n = hit
        region = self._strip(p, d, n, float(self.rng.uniform(10, 32)), lo, hi)
        win = self.window(region, 4)
        if win is None or win[0] < 4 or win[1] < 4 or win[2] >= self.size - 4 or win[3] >= self.size - 4:
            return None
        return region, win

    def jitter(self) -> _Edit | None:
        hit = self.trace_point(5)
        if hit is None:
            return None
        seg, p, _d, n = hit
        half = seg.width / 2 + 3
        found = self._edge_window(hit, -half, half)
        if found is None:
            return None
        region, win = found
        k = self._amount()
        side = 1.0 if self.rng.random() < 0.5 else -1.0
        m = max(abs(n[0]), abs(n[1]))  # pixel-grid shift: k px across horizontal, vertical and diagonal traces alike
        sx, sy = round(n[0] / m * k * side), round(n[1] / m * k * side)
        x1, y1, x2, y2 = win
        shifted = self.tested[y1 - sy : y2 + 1 - sy, x1 - sx : x2 + 1 - sx]
        return self._masked(win, region, shifted, {int(self.labels[_ipt(p)[1], _ipt(p)[0]])})

    def etch(self) -> _Edit | None:
        hit = self.trace_point(5)
        if hit is None:
            return None
        seg, p, _d, _n = hit
        side = 1.0 if self.rng.random() < 0.5 else -1.0
        edge = seg.width / 2 * side
        depth = min(4.0, seg.width / 2 - 1)  # stay on one edge: never reach the far edge of a thin trace
        found = self._edge_window(hit, edge - depth * side, edge + 4 * side)
        if found is None:
            return None
        region, win = found
        over = self.rng.random() < 0.5  # over-etch removes copper; keep at least 4 px of trace
        k = min(self._amount(), max(1, (seg.width - 4) // 2)) if over else self._amount()
        x1, y1, x2, y2 = win
        big = self.tested[y1 - 4 : y2 + 5, x1 - 4 : x2 + 5]
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        morphed = cv2.erode(big, kernel) if over else cv2.dilate(big, kernel)
        return self._masked(win, region, morphed[4:-4, 4:-4], {int(self.labels[_ipt(p)[1], _ipt(p)[0]])})

    def _masked(self, win: IntBox, region: list[Point], source: np.ndarray, allowed: set[int]) -> _Edit | None:
        patch = self.current(win)
        mask = np.zeros_like(patch)
        self.poly(mask, win, region, 1)
        if not self.touches_only(mask, win, allowed, 1):
            return None
        on = mask > 0
        patch[on] = source[on]
        return _Edit(win[0], win[1], patch)

    def shift(self) -> _Edit | None:
        """Misregistration of one pad and the trace ends at it: a disc around the pad moved by 1-3 px."""
        if not self.terminals:
            return None
        t = self.terminals[int(self.rng.integers(len(self.terminals)))]
        radius = t.size + float(self.rng.uniform(3, 10))
        win = self.window([(t.x - radius, t.y - radius), (t.x + radius, t.y + radius)], 1)
        if win is None or win[0] < 4 or win[1] < 4 or win[2] >= self.size - 4 or win[3] >= self.size - 4:
            return None
        k = self._amount()
        angle = float(self.rng.uniform(0, 2 * math.pi))
        sx, sy = round(k * math.cos(angle)), round(k * math.sin(angle))
        if sx == 0 and sy == 0:
            sx = k
        x1, y1, x2, y2 = win
        shifted = self.tested[y1 - sy : y2 + 1 - sy, x1 - sx : x2 + 1 - sx]
        patch = self.current(win)
        mask = np.zeros_like(patch)
        cv2.circle(mask, (t.x - x1, t.y - y1), round(radius), 1, -1, cv2.LINE_8)
        on = mask > 0
        patch[on] = shifted[on]
        return _Edit(win[0], win[1], patch)

    def dust(self) -> _Edit | None:
        rng = self.rng
        for _ in range(20):
            x, y = int(rng.integers(4, self.size - 4)), int(rng.integers(4, self.size - 4))
            if max(self.dist_bg[y, x], self.dist_cu[y, x]) >= 6:
                break
        else:
            return None
        win = (x - 4, y - 4, x + 4, y + 4)
        patch = self.current(win)
        value = 0 if self.template[y, x] else 1
        a, b = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        ox, oy = 4 - a // 2, 4 - b // 2
        if rng.random() < 0.5:
            cv2.rectangle(patch, (ox, oy), (ox + a - 1, oy + b - 1), value, -1)
        else:
            cv2.ellipse(patch, (4, 4), (max(1, a // 2), max(1, b // 2)), 0, 0, 360, value, -1, cv2.LINE_8)
        return _Edit(win[0], win[1], patch)


_NUISANCE_KINDS = ("jitter", "etch", "dust", "shift")
_CORE_KERNEL = np.ones((MIN_DEFECT_CORE, MIN_DEFECT_CORE), np.uint8)


def _proposer(editor: _Editor, name: str) -> Callable[[], _Edit | None]:
    table: dict[str, Callable[[], _Edit | None]] = {
        "open": editor.open_,
        "short": editor.short,
        "mousebite": editor.mousebite,
        "spur": editor.spur,
        "copper": editor.copper,
        "pin-hole": editor.pin_hole,
        "jitter": editor.jitter,
        "etch": editor.etch,
        "dust": editor.dust,
        "shift": editor.shift,
    }
    return table[name]


def _place(editor: _Editor, kinds: tuple[str, ...], count: int, label_of: Callable[[str], str]) -> list[Box]:
    """Place ``count`` non-overlapping edits, each of a uniformly drawn kind; a kind that keeps failing is redrawn."""
    rng = editor.rng
    out: list[Box] = []
    budget = 40 * count
    while len(out) < count and budget > 0:
        kind = kinds[int(rng.integers(len(kinds)))]
        propose = _proposer(editor, kind)
        for _ in range(15):
            budget -= 1
            edit = propose()
            box = editor.commit(edit, label_of(kind)) if edit is not None else None
            if box is not None:
                out.append(box)
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _to_image(copper: np.ndarray) -> np.ndarray:
    return np.where(copper > 0, COPPER_VALUE, LAMINATE_VALUE).astype(np.uint8)


def generate_board(
    rng: np.random.Generator,
    *,
    size: int = 640,
    defects: tuple[int, int] = (3, 12),
    defect_rate: float = 1.0,
    nuisance: tuple[int, int] = (1, 4),
) -> BoardPair:
    """Draw one template, then a tested copy with defects and nuisances.

    The number of defects is uniform in ``defects`` (inclusive) on a board that has defects at all (probability
    ``defect_rate``); the number of nuisances is uniform in ``nuisance`` (inclusive). Placement that cannot fit (small
    boards, crowded layouts) yields fewer edits rather than overlapping ones.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
    for name, (lo, hi) in (("defects", defects), ("nuisance", nuisance)):
        if lo < 0 or hi < lo:
            raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
    lay = _draw_template(rng, size)
    editor = _Editor(rng, lay)
    has_defects = bool(rng.random() < defect_rate)
    n_defects = int(rng.integers(defects[0], defects[1] + 1))
    n_nuisance = int(rng.integers(nuisance[0], nuisance[1] + 1))
    boxes = _place(editor, DEFECT_TYPES, n_defects if has_defects else 0, lambda kind: kind)
    noise = _place(editor, _NUISANCE_KINDS, n_nuisance, lambda _kind: NUISANCE_LABEL)
    return BoardPair(template=_to_image(lay.copper), tested=_to_image(editor.tested), boxes=boxes, nuisance=noise)


def generate_boards(n: int, seed: int, **kw: Any) -> Iterator[BoardPair]:
    """Yield ``n`` boards; board ``i`` depends only on (seed, i), not on ``n`` or on earlier boards."""
    for child in np.random.SeedSequence(seed).spawn(n):
        yield generate_board(np.random.default_rng(child), **kw)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _encode_jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def format_annotations(boxes: list[Box]) -> str:
    """DeepPCB annotation text: one ``x1 y1 x2 y2 type`` line per defect box (type = 1-based DEFECT_TYPES index)."""
    return "".join(f"{b.x1} {b.y1} {b.x2} {b.y2} {DEFECT_TYPES.index(b.label) + 1}\n" for b in boxes)


def write_deeppcb_root(
    root: Path,
    n_boards: int,
    seed: int,
    *,
    size: int = 640,
    defects: tuple[int, int] = (3, 12),
    defect_rate: float = 1.0,
    nuisance: tuple[int, int] = (1, 4),
    group: int = 90000,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n_boards`` synthetic pairs under ``root`` in the DeepPCB PCBData layout and return ``root``.

    Layout: ``group{G}/{G}/{G}{i:03d}_temp.jpg`` / ``_test.jpg``, ``group{G}/{G}_not/{G}{i:03d}.txt`` and
    ``trainval.txt`` (``groupG/G/NNNNNNNN.jpg groupG/G_not/NNNNNNNN.txt`` lines). Groups hold up to 1,000 pairs;
    further pairs go to ``group + 1``, ``group + 2``... Every file is written to a temporary name and renamed;
    ``trainval.txt`` is removed first and written last, so its presence marks a complete root. Nuisance boxes are not
    written (DeepPCB has no such field). ``progress`` is called with the number of pairs written so far.
    """
    if n_boards < 0:
        raise ValueError(f"n_boards must be >= 0, got {n_boards}")
    last_group = group + max(n_boards - 1, 0) // PAIRS_PER_GROUP
    if group < 0 or last_group > 99999:
        raise ValueError(f"group ids {group}..{last_group} do not fit 5 digits")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    listing = root / "trainval.txt"
    listing.unlink(missing_ok=True)
    lines: list[str] = []
    boards = generate_boards(n_boards, seed, size=size, defects=defects, defect_rate=defect_rate, nuisance=nuisance)
    for i, board in enumerate(boards):
        g = f"{group + i // PAIRS_PER_GROUP:05d}"
        stem = f"{g}{i % PAIRS_PER_GROUP:03d}"
        img_dir = root / f"group{g}" / g
        ann_dir = root / f"group{g}" / f"{g}_not"
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(img_dir / f"{stem}_temp.jpg", _encode_jpeg(board.template))
        _write_atomic(img_dir / f"{stem}_test.jpg", _encode_jpeg(board.tested))
        _write_atomic(ann_dir / f"{stem}.txt", format_annotations(board.boxes).encode("ascii"))
        lines.append(f"group{g}/{g}/{stem}.jpg group{g}/{g}_not/{stem}.txt")
        if progress is not None:
            progress(i + 1)
    _write_atomic(listing, "\n".join(lines).encode("ascii"))  # like the real list: no trailing newline
    return root
