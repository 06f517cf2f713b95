"""Classification metrics for verifying PCB defect candidates.

What: the confusion matrix, per-class recall / precision / F1, the two rates the line cares about most and
one-vs-rest precision-recall curves with average precision (AP).

- *escape rate*: fraction of real defects (true label != good class) that the model calls good, i.e. defects
  that would escape to the customer;
- *false-call rate*: fraction of good candidates (true label == good class) still flagged as some defect, i.e.
  operator work the model failed to remove.

A defect classified as the wrong defect type (an ``open`` called ``short``) is neither an escape nor a false
call; it only costs recall of its class.

Why: the release gates (:mod:`evaluation.gates`), the training loop and the HTML report must agree on these
numbers, so they are computed once here by pure numpy functions (arrays in, frozen dataclasses out, no I/O,
no sklearn).

Input conventions shared by every function here:

- ``y_true``: integer class indices, shape ``(N,)``, each in ``[0, C)``;
- ``probs``: finite float scores, shape ``(N, C)``, column ``k`` belonging to ``classes[k]`` (softmax outputs;
  rows need not sum to one because only the argmax and the per-class ranking are used);
- predicted label = ``argmax(probs, axis=1)``; ties go to the lowest class index.

Undefined values are ``NaN`` in the dataclasses and ``None`` in their JSON form (``to_dict``):

- recall of a class with zero support is undefined and excluded from ``macro_recall``;
- precision of a class that is never predicted is ``0.0`` when the class has support (every sample of it was
  missed, the conservative reading) and undefined when it has no support either; a class predicted but absent
  from the data has precision ``0.0`` (all its predictions are wrong);
- ``macro_precision`` is the mean over classes whose precision is defined (support > 0 or predicted at least
  once), so predictions into a class that is absent from the data lower it;
- F1 is undefined when recall is, and ``0.0`` when precision + recall is zero;
- ``escape_rate`` is ``0.0`` when there are no defect samples and ``false_call_rate`` is ``0.0`` when there are
  no good-class samples (nothing can escape / be falsely called). Such a set is still caught by the gates,
  because the recall gate of each class without support fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClassificationMetrics",
    "PRCurve",
    "classification_metrics",
    "confusion_matrix",
    "pr_curves",
]


def nan_to_none(x: float) -> float | None:
    """JSON has no NaN: undefined values are written as ``None``."""
    return None if math.isnan(x) else float(x)


def _none_to_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of one classifier on one evaluation set (see the module docstring for every definition).

    ``confusion[i][j]`` counts samples of true class ``classes[i]`` predicted as ``classes[j]``.
    Undefined per-class values (no support) are ``NaN`` here and ``None`` in :meth:`to_dict`.
    """

    classes: tuple[str, ...]
    good_class: str
    n: int
    accuracy: float
    macro_recall: float
    macro_precision: float
    per_class_recall: dict[str, float]
    per_class_precision: dict[str, float]
    per_class_f1: dict[str, float]
    support: dict[str, int]
    confusion: tuple[tuple[int, ...], ...]
    escape_rate: float
    false_call_rate: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: plain str/int/float/list/dict, ``NaN`` written as ``None``."""
        return {
            "classes": list(self.classes),
            "good_class": self.good_class,
            "n": int(self.n),
            "accuracy": nan_to_none(self.accuracy),
            "macro_recall": nan_to_none(self.macro_recall),
            "macro_precision": nan_to_none(self.macro_precision),
            "per_class_recall": {c: nan_to_none(v) for c, v in self.per_class_recall.items()},
            "per_class_precision": {c: nan_to_none(v) for c, v in self.per_class_precision.items()},
            "per_class_f1": {c: nan_to_none(v) for c, v in self.per_class_f1.items()},
            "support": {c: int(v) for c, v in self.support.items()},
            "confusion": [[int(v) for v in row] for row in self.confusion],
            "escape_rate": nan_to_none(self.escape_rate),
            "false_call_rate": nan_to_none(self.false_call_rate),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassificationMetrics:
        """Inverse of :meth:`to_dict` (``None`` becomes ``NaN``)."""
        return cls(
            classes=tuple(str(c) for c in d["classes"]),
            good_class=str(d["good_class"]),
            n=int(d["n"]),
            accuracy=_none_to_nan(d["accuracy"]),
            macro_recall=_none_to_nan(d["macro_recall"]),
            macro_precision=_none_to_nan(d["macro_precision"]),
            per_class_recall={str(c): _none_to_nan(v) for c, v in d["per_class_recall"].items()},
            per_class_precision={str(c): _none_to_nan(v) for c, v in d["per_class_precision"].items()},
            per_class_f1={str(c): _none_to_nan(v) for c, v in d["per_class_f1"].items()},
            support={str(c): int(v) for c, v in d["support"].items()},
            confusion=tuple(tuple(int(v) for v in row) for row in d["confusion"]),
            escape_rate=_none_to_nan(d["escape_rate"]),
            false_call_rate=_none_to_nan(d["false_call_rate"]),
        )


@dataclass(frozen=True)
class PRCurve:
    """One-vs-rest precision-recall curve of one class, in scikit-learn's layout.

    ``thresholds`` are the distinct scores of the class in increasing order; ``precision[i]`` / ``recall[i]``
    are obtained by predicting the class when its score is ``>= thresholds[i]``. ``precision`` and ``recall``
    have one more element than ``thresholds``: the final point (precision 1, recall 0). ``average_precision`` is
    the step-wise area ``sum_i (R_i - R_{i-1}) * P_i`` (no interpolation).

    A class without positive samples has undefined recall: all tuples are empty and AP is ``NaN``.
    """

    label: str
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    thresholds: tuple[float, ...]
    average_precision: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``NaN`` AP written as ``None``)."""
        return {
            "label": self.label,
            "precision": list(self.precision),
            "recall": list(self.recall),
            "thresholds": list(self.thresholds),
            "average_precision": nan_to_none(self.average_precision),
        }


def _check_labels(y: np.ndarray, n_classes: int, name: str) -> np.ndarray:
    """Validate a 1-D array of class indices and return it as int64."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds label {bad}, outside the valid range [0, {n_classes}) for {n_classes} classes")
    return arr.astype(np.int64)


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(y_true, probs, classes)``; return int64 labels and float64 scores."""
    names = tuple(classes)
    if not names:
        raise ValueError("classes must not be empty")
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise ValueError(f"classes must be unique, duplicated: {dupes}")
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (N,), got shape {y.shape}")
    if y.size == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set (y_true has 0 samples)")
    if p.ndim != 2 or p.shape != (y.shape[0], len(names)):
        raise ValueError(
            f"probs must have shape (N, C) = ({y.shape[0]}, {len(names)}) to match y_true and {len(names)} classes, "
            f"got {p.shape}"
        )
    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise ValueError(f"probs must be real-valued scores, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError(f"probs must be finite, found {int((~np.isfinite(p)).sum())} NaN/inf values")
    return _check_labels(y, len(names), "y_true"), p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Count matrix of shape ``(n_classes, n_classes)``: rows = true class, columns = predicted class.

    Inputs: ``y_true`` and ``y_pred`` are integer class indices of shape ``(N,)`` in ``[0, n_classes)``.
    Empty inputs give an all-zero matrix. Raises ``ValueError`` on shape, dtype or range problems.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t = _check_labels(y_true, n_classes, "y_true")
    p = _check_labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], good_class: str
) -> ClassificationMetrics:
    """Compute :class:`ClassificationMetrics` from labels and scores.

    Inputs: ``y_true`` int ``(N,)`` in ``[0, C)``; ``probs`` float ``(N, C)``, predicted = argmax;
    ``classes`` the ``C`` unique class names in column order; ``good_class`` the name of the "not a defect" class
    (e.g. ``"false_call"``), which must be one of ``classes``.
    Raises ``ValueError`` for an empty set, mismatched shapes, non-finite scores, labels outside ``[0, C)`` or an
    unknown ``good_class``.
    """
    y, p = _check_inputs(y_true, probs, classes)
    names = tuple(str(c) for c in classes)
    if good_class not in names:
        raise ValueError(f"good_class {good_class!r} is not one of the classes {list(names)}")
    g = names.index(good_class)
    n_classes = len(names)

    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.where(support > 0, 0.0, np.nan))
        denom = precision + recall
        f1 = np.where(np.isnan(recall), np.nan, np.where(denom > 0, 2 * precision * recall / denom, 0.0))

    defect_rows = np.arange(n_classes) != g
    n_defect = int(support[defect_rows].sum())
    n_good = int(support[g])
    escape_rate = float(cm[defect_rows, g].sum() / n_defect) if n_defect else 0.0
    false_call_rate = float((n_good - cm[g, g]) / n_good) if n_good else 0.0

    defined_precision = precision[~np.isnan(precision)]
    return ClassificationMetrics(
        classes=names,
        good_class=good_class,
        n=int(y.shape[0]),
        accuracy=float(tp.sum() / y.shape[0]),
        macro_recall=float(np.nanmean(recall)),  # at least one class has support because N > 0
        macro_precision=float(defined_precision.mean()),  # likewise at least one precision is defined
        per_class_recall={c: float(v) for c, v in zip(names, recall, strict=True)},
        per_class_precision={c: float(v) for c, v in zip(names, precision, strict=True)},
        per_class_f1={c: float(v) for c, v in zip(names, f1, strict=True)},
        support={c: int(v) for c, v in zip(names, support, strict=True)},
        confusion=tuple(tuple(int(v) for v in row) for row in cm),
        escape_rate=escape_rate,
        false_call_rate=false_call_rate,
    )


def _pr_curve(label: str, positive: np.ndarray, scores: np.ndarray) -> PRCurve:
    """One-vs-rest PR curve for boolean ``positive`` (N,) and float ``scores`` (N,)."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return PRCurve(label=label, precision=(), recall=(), thresholds=(), average_precision=math.nan)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    hits = positive[order]
    # last index of every run of equal scores: one operating point per distinct threshold
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(hits)[ends].astype(np.float64)
    fps = (ends + 1) - tps
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]
    recall = np.r_[(tps / n_pos)[::-1], 0.0]
    thresholds = s[ends][::-1]
    ap = float(-np.sum(np.diff(recall) * precision[:-1]))
    return PRCurve(
        label=label,
        precision=tuple(float(v) for v in precision),
        recall=tuple(float(v) for v in recall),
        thresholds=tuple(float(v) for v in thresholds),
        average_precision=ap,
    )


def pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, PRCurve]:
    """One-vs-rest :class:`PRCurve` for every class, keyed by class name in ``classes`` order.

    Inputs: ``y_true`` int ``(N,)`` in ``[0, C)``; ``probs`` float ``(N, C)``; the score of class ``k`` is
    ``probs[:, k]``. Matches ``sklearn.metrics.precision_recall_curve`` / ``average_precision_score``.
    Raises ``ValueError`` on the same input problems as :func:`classification_metrics`.
    """
    y, p = _check_inputs(y_true, probs, classes)
    return {str(c): _pr_curve(str(c), y == k, p[:, k]) for k, c in enumerate(classes)}
