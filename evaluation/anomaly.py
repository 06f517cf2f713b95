"""Judging an anomaly model (``task=anomaly``): AUROC at image and pixel level, the operating threshold a line needs,
and the versioned score normalisation stored with the model. Pure functions: arrays in, dataclasses out.

The operating point: a threshold is chosen on the **validation** split for a target escape rate (the share of
defective samples scored below it) or, when validation has no defective samples, for a false-call budget (the share of
good samples scored at or above it); the test split is then judged at that threshold by the same gates as a
classifier (:func:`anomaly_probabilities` turns scores into two-class probabilities whose 0.5 is the threshold, so
:func:`evaluation.metrics.classification_metrics` and :func:`evaluation.gates.evaluate_gates` apply unchanged).

Normalisation ``anomaly-score-v1``: ``normalised = (raw - threshold) / scale`` with ``scale`` the distance from the
median validation good score to the threshold (the interquartile range of the good scores when that is not positive,
1.0 when that is zero too), so 0 is the decision boundary and a typical good part scores -1;
``p(defect) = sigmoid(normalised)`` (a typical good part: 0.27). The exported graph outputs raw scores; this mapping
travels as metadata (:meth:`ScoreNormalization.to_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from defectops.evaluation.intervals import BOOTSTRAP, Interval

__all__ = ["NORMALIZATION_VERSION", "AnomalyAUROC", "ScoreNormalization", "Threshold",
           "anomaly_probabilities", "auroc", "auroc_interval", "choose_threshold", "pixel_auroc", "roc_points"]

NORMALIZATION_VERSION = "anomaly-score-v1"


@dataclass(frozen=True)
class Threshold:
    """The chosen operating point and how it was chosen (``rule``: ``escape_rate`` or ``false_call_rate``)."""

    value: float
    rule: str
    target: float
    val_escape_rate: float | None
    val_false_call_rate: float
    n_good: int
    n_defect: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreNormalization:
    """``anomaly-score-v1`` (module docstring): raw score -> normalised score -> probability of a defect."""

    threshold: float
    scale: float
    version: str = NORMALIZATION_VERSION

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, np.float64) - self.threshold) / self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ScoreNormalization:
        if doc.get("version") != NORMALIZATION_VERSION:
            raise ValueError(f"score normalisation {doc.get('version')!r} is not {NORMALIZATION_VERSION!r}: the model "
                             "was made by another DefectOps version; re-evaluate it with this one")
        return cls(float(doc["threshold"]), float(doc["scale"]))

    @classmethod
    def fit(cls, threshold: float, good_scores: np.ndarray) -> ScoreNormalization:
        good = np.asarray(good_scores, np.float64)
        if not len(good):
            return cls(float(threshold), 1.0)
        q1, median, q3 = np.percentile(good, [25, 50, 75])
        for scale in (float(threshold - median), float(q3 - q1)):
            if scale > 0 and math.isfinite(scale):
                return cls(float(threshold), scale)
        return cls(float(threshold), 1.0)


@dataclass(frozen=True)
class AnomalyAUROC:
    """Image-level AUROC with its bootstrap interval, and pixel-level AUROC where masks exist."""

    image: float
    image_interval: Interval
    pixel: float | None
    n_good: int
    n_defect: int

    def to_dict(self) -> dict[str, Any]:
        return {"image_auroc": self.image, "image_auroc_interval": self.image_interval.to_dict(),
                "pixel_auroc": self.pixel, "n_good": self.n_good, "n_defect": self.n_defect}


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({s.shape[0]}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("anomaly scores contain NaN or infinity: the model or its input is broken")
    return s[~y], s[y]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (True = defective): the probability that a defective
    sample scores above a good one, ties counting half. NaN when either class is absent."""
    good, bad = _split(labels, scores)
    if len(good) == 0 or len(bad) == 0:
        return float("nan")
    ranks = _average_ranks(np.concatenate([good, bad]))
    rank_sum = ranks[len(good):].sum()
    return float((rank_sum - len(bad) * (len(bad) + 1) / 2) / (len(good) * len(bad)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # average of 1-based ranks a+1 .. b
    return ranks


def auroc_interval(labels: np.ndarray, scores: np.ndarray, *, confidence: float = 0.95, n_resamples: int = 1000,
                   seed: int = 0) -> Interval:
    """Stratified bootstrap percentile interval of :func:`auroc` (good and defective resampled separately)."""
    good, bad = _split(labels, scores)
    point = auroc(labels, scores)
    n = len(good) + len(bad)
    if len(good) == 0 or len(bad) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), confidence, BOOTSTRAP, n, "samples")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    y = np.concatenate([np.zeros(len(good), bool), np.ones(len(bad), bool)])
    for i in range(n_resamples):
        g = good[rng.integers(0, len(good), len(good))]
        b = bad[rng.integers(0, len(bad), len(bad))]
        values[i] = auroc(y, np.concatenate([g, b]))
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return Interval(point, float(lo), float(hi), confidence, BOOTSTRAP, n, "samples")


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC of anomaly-map values against ground-truth masks over every pixel of every image (NaN without defect
    pixels). ``masks`` and ``maps``: the same shape, N x H x W."""
    m = np.asarray(masks).astype(bool)
    a = np.asarray(maps, np.float64)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and anomaly maps {a.shape} differ in shape")
    return auroc(m.ravel(), a.ravel())


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: false-positive rates, true-positive rates and the thresholds (descending) they occur at."""
    good, bad = _split(labels, scores)
    thresholds = np.unique(np.concatenate([good, bad]))[::-1]
    fpr = np.array([0.0] + [float((good >= t).mean()) if len(good) else 0.0 for t in thresholds])
    tpr = np.array([0.0] + [float((bad >= t).mean()) if len(bad) else 0.0 for t in thresholds])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def choose_threshold(labels: np.ndarray, scores: np.ndarray, *, max_escape_rate: float,
                     max_false_call_rate: float) -> Threshold:
    """The operating threshold from validation scores (a sample is called defective when ``score >= threshold``).

    ``high`` = the highest threshold at which no more than ``floor(max_escape_rate * n_defect)`` defective samples
    fall below it; ``low`` = the lowest at which no more than ``floor(max_false_call_rate * n_good)`` good samples
    reach it. When ``low <= high`` both targets hold anywhere between, and the threshold is the middle (the most
    margin on both sides: a few validation defects say little about the lowest a defect can score). When
    ``low > high`` they conflict and the escape target wins (``high``; the note says so). Without defective samples
    the threshold is ``low``.
    """
    for name, v in (("max_escape_rate", max_escape_rate), ("max_false_call_rate", max_false_call_rate)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name}={v} must lie in [0, 1)")
    good, bad = _split(labels, scores)
    if len(good) == 0:
        raise ValueError("the validation split has no good samples: an anomaly threshold cannot be chosen")
    allowed_fc = math.floor(max_false_call_rate * len(good))
    low = float(np.nextafter(np.sort(good)[::-1][allowed_fc], np.inf))
    if len(bad):
        high = float(np.sort(bad)[math.floor(max_escape_rate * len(bad))])
        if low <= high:
            value, rule, target = (low + high) / 2, "escape_rate", max_escape_rate
            note = ""
        else:
            value, rule, target = high, "escape_rate", max_escape_rate
            note = (f"the escape target and the false-call budget conflict on validation: the escape target wins "
                    f"(the false-call budget {max_false_call_rate} is exceeded)")
    else:
        value, rule, target = low, "false_call_rate", max_false_call_rate
        note = "validation has no defective samples: threshold set by the false-call budget on good samples only"
    escape = float((bad < value).mean()) if len(bad) else None
    return Threshold(value, rule, target, escape, float((good >= value).mean()), len(good), len(bad), note)


def anomaly_probabilities(scores: np.ndarray, norm: ScoreNormalization) -> np.ndarray:
    """N x 2 probabilities ``[good, defect]`` with ``defect > good`` (the argmax is ``defect``) exactly when
    ``score >= threshold``."""
    z = norm.normalise(scores)
    p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    p = np.where(z >= 0, np.maximum(p, np.nextafter(0.5, 1)), np.minimum(p, np.nextafter(0.5, 0)))
    return np.stack([1.0 - p, p], axis=1)
