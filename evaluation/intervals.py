"""Confidence intervals for every headline figure: Wilson for rates, a bootstrap for macro recall and board scores.

What:

- :class:`Interval`: a point estimate with its lower and upper bound, the confidence level, how it was computed and
  over how many trials or resampling units (``n``, counted in ``unit``: defects, crops, boards...).
- :func:`wilson_interval`: the Wilson score interval of a binomial proportion ``successes / n``. It stays inside
  [0, 1] and is not degenerate at 0 or n successes (0 of 10 gives [0, 0.2775] at 95 %), unlike the normal
  approximation, which is why it is used for recalls and for the escape and false-call rates.
- :func:`classification_intervals`: Wilson intervals from a confusion matrix for each class's recall, the escape rate
  (defects called good / defects) and the false-call rate (good flagged / good), plus (optionally) the macro-recall
  interval of :func:`bootstrap_macro_recall`.
- :func:`bootstrap_macro_recall`: a percentile bootstrap of macro recall that resamples *groups* (e.g. the boards the
  crops come from) with replacement, since crops of one board are not independent trials.
- :func:`bootstrap_board_scores`: a percentile bootstrap over boards of the DeepPCB mAP and F-score
  (:mod:`evaluation.deeppcb`). The benchmark's matching is done once per board; each resample weights every board by
  how often it was drawn (a board drawn k times contributes its detections k times to the confidence ranking and its
  counts k times to the pooled precision and recall). :func:`weighted_board_scores` with every weight 1 is exactly
  :func:`evaluation.deeppcb.score`.

Why: a figure on a small held-out set says little without its uncertainty ("0 escapes" out of 20 defects is
compatible with a true escape rate of 16 %), and the gates may compare the bound instead of the point
(``GateConfig.use_upper_bound``). Pure functions (arrays in, frozen dataclasses out, no I/O); every bootstrap is
deterministic for its seed.

Undefined values: an interval over no trials (``n == 0``: no defects to escape, a class without samples, no boards)
has ``NaN`` point and bounds here and ``None`` in :meth:`Interval.to_dict`; :meth:`Interval.format` writes ``n/a``.
A bootstrap cannot show variation that the data never shows: a perfect score gives the interval [1, 1] (the Wilson
intervals of the per-class recalls do not have that blind spot).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from defectops.evaluation.deeppcb import IOU_THRESHOLD, Detection, GroundTruth, match_image, score
from defectops.evaluation.metrics import ClassificationMetrics, nan_to_none

__all__ = [
    "BoardIntervals",
    "BoardMatches",
    "ClassificationIntervals",
    "Interval",
    "board_breakdown",
    "bootstrap_board_scores",
    "bootstrap_macro_recall",
    "classification_intervals",
    "error_counts",
    "match_boards",
    "weighted_board_scores",
    "wilson_interval",
]

DEFAULT_RESAMPLES = 1000
WILSON = "wilson"
BOOTSTRAP = "bootstrap"


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


@dataclass(frozen=True)
class Interval:
    """``point`` with the bounds ``[low, high]`` at ``confidence`` (e.g. 0.95), computed by ``method`` (``wilson`` or
    ``bootstrap``) over ``n`` trials or resampling units counted in ``unit``. Undefined (``n == 0``): all three are
    ``NaN``."""

    point: float
    low: float
    high: float
    confidence: float
    method: str
    n: int
    unit: str = ""

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.point) or math.isnan(self.low) or math.isnan(self.high))

    def format(self, digits: int = 3) -> str:
        """``0.987 [0.975, 0.994]``; ``n/a`` when undefined."""
        if not self.defined:
            return "n/a"
        return f"{self.point:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def format_bounds(self, digits: int = 3) -> str:
        """``[0.975, 0.994]`` (the bounds alone, to write next to a value shown elsewhere); empty when undefined."""
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]" if self.defined else ""

    def describe(self) -> str:
        """What the interval is, in words: ``95 % Wilson, n = 20 defects``."""
        what = "Wilson" if self.method == WILSON else "bootstrap" if self.method == BOOTSTRAP else self.method
        return f"{100 * self.confidence:g} % {what}, n = {self.n}{' ' + self.unit if self.unit else ''}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``NaN`` written as ``None``)."""
        return {"point": nan_to_none(self.point), "low": nan_to_none(self.low), "high": nan_to_none(self.high),
                "confidence": float(self.confidence), "method": self.method, "n": int(self.n), "unit": self.unit}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interval:
        """Inverse of :meth:`to_dict` (``None`` becomes ``NaN``; ``unit`` may be absent)."""
        return cls(point=_nan(d.get("point")), low=_nan(d.get("low")), high=_nan(d.get("high")),
                   confidence=float(d["confidence"]), method=str(d["method"]), n=int(d["n"]),
                   unit=str(d.get("unit") or ""))


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:  # NaN fails too
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return c


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + _check_confidence(confidence) / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95, *, unit: str = "") -> Interval:
    """Wilson score interval of the proportion ``successes / n`` at ``confidence``.

    ``low, high = (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the two-sided normal quantile
    (1.95996 at 95 %); the bound is exactly 0 at 0 successes and exactly 1 at ``n``. ``n == 0`` gives an undefined
    interval (``NaN`` point and bounds, see the module docstring). ValueError for negative counts, ``successes > n``
    or a confidence outside (0, 1).
    """
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise ValueError(f"wilson_interval needs integer counts, got successes={successes!r}, n={n!r}")
    k, total = int(successes), int(n)
    if total < 0 or k < 0 or k > total:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={k}, n={total}")
    z = _z(confidence)
    if total == 0:
        return Interval(math.nan, math.nan, math.nan, float(confidence), WILSON, 0, unit)
    p = k / total
    z2n = z * z / total
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / total + z2n / (4 * total)) / (1 + z2n)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == total else min(1.0, centre + half)
    return Interval(p, low, high, float(confidence), WILSON, total, unit)


def _percentile_interval(point: float, values: np.ndarray, confidence: float, n: int, unit: str) -> Interval:
    alpha = 1.0 - confidence
    finite = values[np.isfinite(values)]
    if n == 0 or finite.size == 0 or math.isnan(point):
        return Interval(math.nan, math.nan, math.nan, confidence, BOOTSTRAP, n, unit)
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return Interval(float(point), float(low), float(high), confidence, BOOTSTRAP, n, unit)


def _resample_weights(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_units) int64: how often each unit is drawn in each resample of n_units draws with
    replacement."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_resamples).astype(np.int64)


# -- classification ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationIntervals:
    """Intervals of a :class:`~evaluation.metrics.ClassificationMetrics`: Wilson for every class's recall and for the
    two rates, and the bootstrap interval of macro recall when it was computed (``None`` otherwise)."""

    confidence: float
    per_class_recall: dict[str, Interval]
    escape_rate: Interval
    false_call_rate: Interval
    macro_recall: Interval | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the ``intervals`` entry of ``metrics.json``."""
        return {"confidence": float(self.confidence),
                "per_class_recall": {c: v.to_dict() for c, v in self.per_class_recall.items()},
                "escape_rate": self.escape_rate.to_dict(), "false_call_rate": self.false_call_rate.to_dict(),
                "macro_recall": None if self.macro_recall is None else self.macro_recall.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassificationIntervals:
        """Inverse of :meth:`to_dict`."""
        macro = d.get("macro_recall")
        return cls(confidence=float(d["confidence"]),
                   per_class_recall={str(c): Interval.from_dict(v) for c, v in d["per_class_recall"].items()},
                   escape_rate=Interval.from_dict(d["escape_rate"]),
                   false_call_rate=Interval.from_dict(d["false_call_rate"]),
                   macro_recall=None if macro is None else Interval.from_dict(macro))

    @classmethod
    def of_metrics_dict(cls, d: Mapping[str, Any]) -> ClassificationIntervals | None:
        """The intervals of a ``metrics.json``: its ``intervals`` entry, else (a file written before intervals
        existed) the Wilson intervals recomputed from its confusion matrix, without macro recall; ``None`` when
        neither is readable."""
        try:
            if d.get("intervals"):
                return cls.from_dict(d["intervals"])
            return classification_intervals(ClassificationMetrics.from_dict(d))
        except (KeyError, TypeError, ValueError, IndexError):
            return None


def error_counts(metrics: ClassificationMetrics) -> dict[str, tuple[int, int]]:
    """``(events, trials)`` behind each rate from the confusion matrix: ``escape_rate`` (defects called good, defects)
    and ``false_call_rate`` (good candidates flagged as a defect, good candidates)."""
    cm = np.asarray(metrics.confusion, dtype=np.int64).reshape(len(metrics.classes), len(metrics.classes))
    g = metrics.classes.index(metrics.good_class)
    defect = np.arange(len(metrics.classes)) != g
    n_good = int(cm[g].sum())
    return {"escape_rate": (int(cm[defect, g].sum()), int(cm[defect].sum())),
            "false_call_rate": (n_good - int(cm[g, g]), n_good)}


def classification_intervals(metrics: ClassificationMetrics, confidence: float = 0.95, *,
                             macro_recall: Interval | None = None) -> ClassificationIntervals:
    """Wilson intervals from ``metrics.confusion``: recall of each class (correct / samples of the class; unit
    ``samples``), the escape rate (unit ``defects``) and the false-call rate (unit ``good``); ``macro_recall`` is
    passed through (see :func:`bootstrap_macro_recall`). A class without samples, or a rate without trials, gets an
    undefined interval."""
    cm = np.asarray(metrics.confusion, dtype=np.int64).reshape(len(metrics.classes), len(metrics.classes))
    recall = {c: wilson_interval(int(cm[i, i]), int(cm[i].sum()), confidence, unit="samples")
              for i, c in enumerate(metrics.classes)}
    counts = error_counts(metrics)
    return ClassificationIntervals(
        confidence=float(confidence), per_class_recall=recall,
        escape_rate=wilson_interval(*counts["escape_rate"], confidence, unit="defects"),
        false_call_rate=wilson_interval(*counts["false_call_rate"], confidence, unit="good"),
        macro_recall=macro_recall)


def bootstrap_macro_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *,
                           groups: Sequence[Any] | np.ndarray | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                           confidence: float = 0.95, seed: int = 0, unit: str | None = None) -> Interval:
    """Percentile-bootstrap interval of macro recall (mean recall over the classes with samples).

    Inputs: ``y_true`` and ``y_pred`` integer class indices ``(N,)`` in ``[0, n_classes)``; ``groups`` one id per
    sample (any hashable values, e.g. the board a crop was cut from): whole groups are resampled with replacement, so
    that samples that are not independent move together; without ``groups`` every sample is its own unit. Each of
    ``n_resamples`` resamples draws as many units as there are; a class absent from a resample is left out of that
    resample's mean, as :func:`evaluation.metrics.classification_metrics` leaves out classes without support.
    ``n`` of the result is the number of units (``unit``: ``groups`` or ``samples`` unless given). Deterministic for
    ``seed``; an empty input gives an undefined interval.
    """
    confidence = _check_confidence(confidence)
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, got shapes {t.shape} and {p.shape}")
    if t.size and (not np.issubdtype(t.dtype, np.integer) or not np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"y_true and y_pred must hold integer class indices, got {t.dtype} and {p.dtype}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError(f"class indices must lie in [0, {n_classes}) for n_classes={n_classes}")
    name = unit or ("groups" if groups is not None else "samples")
    if groups is None:
        unit_of = np.arange(t.size)
    else:
        g = list(groups)
        if len(g) != t.size:
            raise ValueError(f"groups must give one id per sample: {len(g)} ids for {t.size} samples")
        index: dict[Any, int] = {}
        unit_of = np.asarray([index.setdefault(x, len(index)) for x in g], dtype=np.int64)
    n_units = int(unit_of.max()) + 1 if t.size else 0
    if n_units == 0:
        return Interval(math.nan, math.nan, math.nan, confidence, BOOTSTRAP, 0, name)
    support = np.zeros((n_units, n_classes), np.int64)
    correct = np.zeros((n_units, n_classes), np.int64)
    np.add.at(support, (unit_of, t), 1)
    np.add.at(correct, (unit_of, t), (t == p).astype(np.int64))

    def macro(sup: np.ndarray, cor: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(sup > 0, cor / np.maximum(sup, 1), np.nan)
            has = (sup > 0).sum(axis=-1)
            return np.where(has > 0, np.nansum(recall, axis=-1) / np.maximum(has, 1), np.nan)

    point = float(macro(support.sum(0), correct.sum(0)))
    w = _resample_weights(n_units, n_resamples, seed)
    values = macro(w @ support, w @ correct)
    return _percentile_interval(point, values, confidence, n_units, name)


# -- DeepPCB board scores --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BoardMatches:
    """The benchmark's matching of a set of boards, done once (:func:`match_boards`).

    Boards are in sorted key order (as :func:`evaluation.deeppcb.score` visits them). All detections of all boards are
    in the benchmark's global ranking: ``det_board[i]`` is the board of the i-th ranked detection and ``det_correct[i]``
    whether it is a true positive. Per board: ``n_gt``, ``n_det`` and ``n_correct``.
    """

    keys: tuple[str, ...]
    det_board: np.ndarray
    det_correct: np.ndarray
    n_gt: np.ndarray
    n_det: np.ndarray
    n_correct: np.ndarray


def match_boards(images: Mapping[str, tuple[Sequence[GroundTruth], Sequence[Detection]]],
                 iou_threshold: float = IOU_THRESHOLD) -> BoardMatches:
    """Match every board once, exactly as :func:`evaluation.deeppcb.score` does, and rank all detections."""
    keys = tuple(sorted(images))
    confidences: list[float] = []
    correct: list[bool] = []
    board: list[int] = []
    n_gt, n_det, n_correct = (np.zeros(len(keys), np.int64) for _ in range(3))
    for b, key in enumerate(keys):
        gts, dets = images[key]
        matches = match_image(gts, dets, iou_threshold)  # validates the confidences
        for i in sorted(range(len(dets)), key=lambda i: -dets[i].confidence):  # the benchmark's stable order
            confidences.append(float(dets[i].confidence))
            correct.append(matches[i].correct)
            board.append(b)
        n_gt[b], n_det[b] = len(gts), len(dets)
        n_correct[b] = sum(m.correct for m in matches)
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    return BoardMatches(keys=keys, det_board=np.asarray(board, np.int64)[order],
                        det_correct=np.asarray(correct, bool)[order], n_gt=n_gt, n_det=n_det, n_correct=n_correct)


def weighted_board_scores(matches: BoardMatches, weights: np.ndarray) -> dict[str, np.ndarray]:
    """mAP, precision, recall and F-score, each ``(R,)``, of ``R`` weightings of the boards (``weights`` ``(R, B)``
    non-negative integers: board b enters weighting r ``weights[r, b]`` times). A board's copies rank their detections
    next to each other; every weight 1 gives :func:`evaluation.deeppcb.score`'s numbers."""
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != len(matches.keys):
        raise ValueError(f"weights must have shape (R, {len(matches.keys)}) for {len(matches.keys)} boards, "
                         f"got {w.shape}")
    if w.size and (not np.issubdtype(w.dtype, np.integer) or w.min() < 0):
        raise ValueError("weights must be non-negative integers (how often each board is drawn)")
    w = w.astype(np.int64)
    n_gt, n_det, n_correct = w @ matches.n_gt, w @ matches.n_det, w @ matches.n_correct
    with np.errstate(divide="ignore", invalid="ignore"):  # the benchmark's arithmetic, element-wise
        precision = np.where(n_det > 0, n_correct / np.maximum(n_det, 1), 0.0)
        recall = np.where(n_gt > 0, n_correct / np.maximum(n_gt, 1), 0.0)
        total = precision + recall
        fscore = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)
    ap = np.zeros(w.shape[0])
    det_w = w[:, matches.det_board]  # (R, D): copies of each ranked detection
    for r in range(w.shape[0]):
        hits = np.repeat(matches.det_correct, det_w[r])
        ranks = np.flatnonzero(hits) + 1
        s = float((np.arange(1, ranks.size + 1) / ranks).sum())
        ap[r] = s / n_gt[r] if n_gt[r] > 0 else s
    return {"map": ap, "precision": precision, "recall": recall, "fscore": fscore}


@dataclass(frozen=True)
class BoardIntervals:
    """Bootstrap intervals over boards of the DeepPCB scores (unit ``boards``)."""

    map: Interval
    fscore: Interval
    precision: Interval
    recall: Interval

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the ``intervals`` entry of a split in ``board_metrics.json``."""
        return {"map": self.map.to_dict(), "fscore": self.fscore.to_dict(), "precision": self.precision.to_dict(),
                "recall": self.recall.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BoardIntervals:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: Interval.from_dict(d[k]) for k in ("map", "fscore", "precision", "recall")})


def bootstrap_board_scores(images: Mapping[str, tuple[Sequence[GroundTruth], Sequence[Detection]]], *,
                           iou_threshold: float = IOU_THRESHOLD, n_resamples: int = DEFAULT_RESAMPLES,
                           confidence: float = 0.95, seed: int = 0,
                           matches: BoardMatches | None = None) -> BoardIntervals:
    """Percentile-bootstrap intervals over boards of the DeepPCB mAP, F-score, precision and recall.

    ``images`` as for :func:`evaluation.deeppcb.score` (key -> (ground truths, detections)); pass ``matches`` (from
    :func:`match_boards` on the same images) to reuse a matching. Each resample draws as many boards as there are,
    with replacement, and recomputes the scores (:func:`weighted_board_scores`); the points are the scores of the
    boards as given. Deterministic for ``seed``; no boards give undefined intervals.
    """
    confidence = _check_confidence(confidence)
    m = matches if matches is not None else match_boards(images, iou_threshold)
    n = len(m.keys)
    if n == 0:
        undefined = Interval(math.nan, math.nan, math.nan, confidence, BOOTSTRAP, 0, "boards")
        return BoardIntervals(undefined, undefined, undefined, undefined)
    point = weighted_board_scores(m, np.ones((1, n), np.int64))
    boot = weighted_board_scores(m, _resample_weights(n, n_resamples, seed))
    out = {k: _percentile_interval(float(point[k][0]), boot[k], confidence, n, "boards") for k in point}
    return BoardIntervals(map=out["map"], fscore=out["fscore"], precision=out["precision"], recall=out["recall"])


def board_breakdown(images: Mapping[str, tuple[Sequence[GroundTruth], Sequence[Detection]]],
                    groups: Mapping[str, str], *, iou_threshold: float = IOU_THRESHOLD,
                    n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """What ``board_metrics.json`` adds to a split's scores (JSON-ready).

    ``intervals``: :func:`bootstrap_board_scores`; ``per_group``: group -> ``boards``, ``map``, ``fscore``,
    ``precision``, ``recall``, the benchmark's scores of the boards of each group (e.g. a board design; a board missing
    from ``groups`` is its own group); ``worst_group``: ``group`` and the scores of the group with the lowest F-score
    (ties to the first name), ``None`` without boards.
    """
    def group_of(key: str) -> str:
        return groups.get(key, key)

    per_group: dict[str, dict[str, Any]] = {}
    for g in sorted({group_of(k) for k in images}):
        sc = score({k: v for k, v in images.items() if group_of(k) == g}, iou_threshold=iou_threshold)
        per_group[g] = {"boards": sc.n_images, "map": sc.map, "fscore": sc.fscore, "precision": sc.precision,
                        "recall": sc.recall}
    worst = min(per_group, key=lambda g: (per_group[g]["fscore"], g)) if per_group else None
    intervals = bootstrap_board_scores(images, iou_threshold=iou_threshold, n_resamples=n_resamples,
                                       confidence=confidence, seed=seed)
    return {"intervals": intervals.to_dict(), "per_group": per_group,
            "worst_group": None if worst is None else {"group": worst, **per_group[worst]}}


def interval_unit(units: Sequence[str]) -> str:
    """What a bootstrap over ``units`` (``<kind>:<id>`` strings, see ``training.snapshot.resampling_units``)
    resamples, in words for the report."""
    kinds = {u.split(":", 1)[0] for u in units}
    if kinds == {"group", "crop"}:
        return "images (a duplicate group as one)"
    return {"board": "boards", "group": "groups", "crop": "crops"}.get(kinds.pop(), "units") if len(kinds) == 1 \
        else "boards or crops"


def metrics_intervals(metrics: ClassificationMetrics, y: np.ndarray, pred: np.ndarray, units: Sequence[str],
                      confidence: float) -> ClassificationIntervals:
    """Wilson intervals of the recalls and rates, and macro recall bootstrapped over ``units`` (seed 0)."""
    macro = bootstrap_macro_recall(y, pred, len(metrics.classes), groups=list(units), confidence=confidence, seed=0,
                                   unit=interval_unit(units))
    return classification_intervals(metrics, confidence, macro_recall=macro)
