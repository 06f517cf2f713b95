"""Drift between a reference profile (what a model was validated on) and a batch of production images.

Pure functions: arrays in, dataclasses out, no I/O (``defectops.evaluation.drift_profile`` reads and writes profiles,
``evaluation.drift_report`` renders the HTML report, ``pipelines.cli_drift`` is ``defectops drift check``).

A :class:`Profile` summarises a set of images seen through one model:

* image statistics per image and channel (:func:`image_stats`): mean intensity, contrast (standard deviation),
  sharpness (variance of the Laplacian) and foreground ratio (fraction of pixels at or above mid-grey), plus a
  16-bin intensity histogram per channel;
* penultimate-layer embeddings of the model;
* the model's softmax outputs (prediction mix and confidence = max softmax) and the true class priors where known.

:func:`compare` runs one test per signal: a two-sample Kolmogorov-Smirnov test per image statistic (with the
population stability index, PSI, as its effect size), a kernel two-sample test (MMD with an RBF kernel, median
heuristic bandwidth, permutation p-value) on the embeddings, a chi-square test of the predicted-class counts against
the reference's and a KS test on the confidences. The combined decision controls the false-alarm rate with a
Bonferroni correction: the batch has drifted when any signal's p-value is below ``alpha / k`` (``k`` signals), so
under no drift the probability of a false alarm is at most ``alpha`` (0.01 by default). Image statistics must also
move by at least ``min_psi`` (a material shift, not only a statistically detectable one) to count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import stats

__all__ = [
    "STAT_NAMES",
    "DriftReport",
    "Profile",
    "SignalResult",
    "compare",
    "image_stats",
    "ks",
    "mmd_permutation_test",
    "prediction_mix_test",
    "psi",
    "subsample",
]

STAT_NAMES = ("mean", "contrast", "sharpness", "foreground")
HIST_BINS = 16
AOI_CHANNELS = ("tested", "template", "difference")
RGB_CHANNELS = ("red", "green", "blue")
_EPS = 1e-4


# --------------------------------------------------------------------------------------------------- image stats
def image_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image statistics of ``images`` (N, H, W, C) uint8.

    Returns ``(features, histograms)``: ``features`` (N, 4 * C) float32 ordered stat-major
    (``mean[c0..], contrast[c0..], sharpness[c0..], foreground[c0..]``, see :func:`feature_names`), ``histograms``
    (N, C, 16) float32, each row a normalised intensity histogram.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {images.shape} {images.dtype}")
    n, _, _, c = images.shape
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2))
    contrast = x.std(axis=(1, 2))
    sharp = np.empty((n, c), np.float32)
    for i in range(n):
        lap = cv2.Laplacian(np.ascontiguousarray(images[i]), cv2.CV_32F, ksize=1)
        sharp[i] = lap.reshape(-1, c).var(axis=0)
    fg = (images >= 128).mean(axis=(1, 2), dtype=np.float32)
    bins = (images >> 4).reshape(n, -1, c).astype(np.int64)  # 16 bins of 16 grey levels
    hist = np.empty((n, c, HIST_BINS), np.float32)
    offsets = (np.arange(n) * HIST_BINS)[:, None]
    for k in range(c):
        counts = np.bincount((bins[:, :, k] + offsets).ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS)
        hist[:, k] = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    feats = np.concatenate([mean, contrast, sharp, fg], axis=1).astype(np.float32)
    return feats, hist


def channel_names(task: str, channels: int = 3) -> tuple[str, ...]:
    """Names of the image channels: (tested, template, difference) for AOI crops, RGB otherwise."""
    names = AOI_CHANNELS if task == "aoi" else RGB_CHANNELS
    return names[:channels] if channels <= len(names) else tuple(f"c{i}" for i in range(channels))


def feature_names(channels: Sequence[str]) -> tuple[str, ...]:
    """Column names of :func:`image_stats` features, e.g. ``sharpness (tested)``."""
    return tuple(f"{s} ({c})" for s in STAT_NAMES for c in channels)


# --------------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True, eq=False)
class Profile:
    """What a model saw on a set of images (a reference or a production batch)."""

    features: np.ndarray  # (N, F) image statistics
    histograms: np.ndarray  # (N, C, 16)
    embeddings: np.ndarray  # (M, D) penultimate-layer embeddings (M <= N: may be subsampled)
    probs: np.ndarray  # (N, K) softmax outputs
    classes: tuple[str, ...]
    channels: tuple[str, ...]
    labels: np.ndarray | None = None  # (N,) true classes where known (reference)

    def __post_init__(self) -> None:
        n = len(self.features)
        if len(self.histograms) != n or len(self.probs) != n:
            raise ValueError(f"profile arrays disagree: {n} features, {len(self.histograms)} histograms, "
                             f"{len(self.probs)} probabilities")
        if self.probs.ndim != 2 or self.probs.shape[1] != len(self.classes):
            raise ValueError(f"probabilities {self.probs.shape} do not match {len(self.classes)} classes")
        if self.features.shape[1] != len(STAT_NAMES) * len(self.channels):
            raise ValueError(f"{self.features.shape[1]} features for {len(self.channels)} channels")

    @property
    def size(self) -> int:
        return len(self.features)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return feature_names(self.channels)

    @property
    def predicted(self) -> np.ndarray:
        return np.asarray(self.probs.argmax(axis=1))

    @property
    def confidence(self) -> np.ndarray:
        return np.asarray(self.probs.max(axis=1))

    def prediction_counts(self) -> np.ndarray:
        return np.bincount(self.predicted, minlength=len(self.classes))

    def priors(self) -> dict[str, float] | None:
        """True class priors (reference only)."""
        if self.labels is None or not len(self.labels):
            return None
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: float(v) / float(counts.sum()) for c, v in zip(self.classes, counts, strict=True)}

    def take(self, index: np.ndarray, embedding_index: np.ndarray | None = None) -> Profile:
        """The profile of a subset of rows (``embedding_index`` defaults to ``index`` when embeddings are full)."""
        emb_idx = index if embedding_index is None else embedding_index
        return Profile(self.features[index], self.histograms[index], self.embeddings[emb_idx], self.probs[index],
                       self.classes, self.channels, None if self.labels is None else self.labels[index])


def subsample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n, k)`` rows drawn without replacement (all rows when ``n <= k``)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


# --------------------------------------------------------------------------------------------------- tests
def psi(ref: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``new`` against ``ref`` on the reference's quantile bins (<0.1 stable,
    0.1-0.25 moderate, >0.25 major shift by the usual rule of thumb)."""
    ref = np.asarray(ref, np.float64).ravel()
    new = np.asarray(new, np.float64).ravel()
    if not len(ref) or not len(new):
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    q = np.bincount(np.searchsorted(edges, new, side="right"), minlength=len(edges) + 1) / len(new)
    p, q = np.clip(p, _EPS, None), np.clip(q, _EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def histogram_psi(ref_hist: np.ndarray, new_hist: np.ndarray) -> float:
    """PSI between two pooled histograms (rows normalised, any shape ending in bins)."""
    p = np.clip(np.asarray(ref_hist, np.float64) / max(float(np.sum(ref_hist)), _EPS), _EPS, None)
    q = np.clip(np.asarray(new_hist, np.float64) / max(float(np.sum(new_hist)), _EPS), _EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def ks(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: ``(statistic, p-value)``."""
    ref, new = np.asarray(ref, np.float64).ravel(), np.asarray(new, np.float64).ravel()
    if not len(ref) or not len(new):
        return float("nan"), 1.0
    r = stats.ks_2samp(ref, new, method="auto")
    return float(r.statistic), float(r.pvalue)


def _sq_dists(a: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", a, a)
    d = sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)
    return np.asarray(np.maximum(d, 0.0))


def mmd_permutation_test(ref_emb: np.ndarray, new_emb: np.ndarray, n_perm: int = 200, seed: int = 0,
                         max_rows: int = 512) -> tuple[float, float, float]:
    """Kernel two-sample test of ``new_emb`` against ``ref_emb``: ``(MMD^2, permutation p-value, bandwidth)``.

    RBF kernel ``exp(-d^2 / (2 sigma^2))`` with ``sigma`` the median pairwise distance of the pooled sample (median
    heuristic); biased (V-statistic) MMD^2; the p-value is ``(1 + #{permuted >= observed}) / (1 + n_perm)`` over
    random relabellings of the pooled rows. Each side is subsampled to ``max_rows`` rows to bound the cost
    (O((2 max_rows)^2 n_perm)).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(ref_emb, np.float64)
    y = np.asarray(new_emb, np.float64)
    if len(x) < 2 or len(y) < 2:
        return float("nan"), 1.0, float("nan")
    if len(x) > max_rows:
        x = x[rng.choice(len(x), max_rows, replace=False)]
    if len(y) > max_rows:
        y = y[rng.choice(len(y), max_rows, replace=False)]
    z = np.concatenate([x, y])
    d2 = _sq_dists(z)
    off = d2[np.triu_indices(len(z), k=1)]
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d2 / med)  # sigma^2 = median(d^2) / 2
    m, n = len(x), len(y)
    w = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(w @ k @ w)
    perms = np.stack([w[rng.permutation(m + n)] for _ in range(n_perm)]) if n_perm > 0 else np.zeros((0, m + n))
    null = np.einsum("pi,pi->p", perms @ k, perms)
    p = (1.0 + float(np.sum(null >= observed - 1e-12))) / (1.0 + n_perm)
    return max(observed, 0.0), p, math.sqrt(med / 2.0)


def prediction_mix_test(ref_counts: np.ndarray, new_counts: np.ndarray) -> tuple[float, float, float]:
    """Chi-square test of homogeneity of two predicted-class count vectors: ``(chi2, p-value, total variation)``.

    A two-sample test (a 2 x K contingency table), so the reference's own sampling noise is accounted for. Classes
    neither side predicts are dropped; one class left means no evidence of change (p = 1).
    """
    a, b = np.asarray(ref_counts, np.float64), np.asarray(new_counts, np.float64)
    tv = 0.5 * float(np.abs(a / max(a.sum(), 1) - b / max(b.sum(), 1)).sum())
    keep = (a + b) > 0
    if keep.sum() < 2 or a.sum() == 0 or b.sum() == 0:
        return 0.0, 1.0, tv
    chi2, p, _, _ = stats.chi2_contingency(np.stack([a[keep], b[keep]]), correction=False)
    return float(chi2), float(p), tv


# --------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class SignalResult:
    """One test. ``drifted`` = ``p_value < threshold`` (and, for image statistics, ``effect >= min_effect``)."""

    name: str
    kind: str  # image | embedding | predictions | confidence
    test: str
    statistic: float
    p_value: float
    threshold: float
    drifted: bool
    effect: float | None = None  # PSI (image statistics), total variation (prediction mix), KS D (confidence)
    effect_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        def num(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        return {"name": self.name, "kind": self.kind, "test": self.test, "statistic": num(self.statistic),
                "p_value": num(self.p_value), "threshold": self.threshold, "drifted": self.drifted,
                "effect": num(self.effect), "effect_name": self.effect_name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SignalResult:
        nan = float("nan")
        return cls(d["name"], d["kind"], d["test"], nan if d["statistic"] is None else d["statistic"],
                   1.0 if d["p_value"] is None else d["p_value"], d["threshold"], bool(d["drifted"]), d.get("effect"),
                   d.get("effect_name", ""))


@dataclass(frozen=True)
class DriftReport:
    """Per-signal results and the combined decision (Bonferroni: any ``p < alpha / k``)."""

    drifted: bool
    alpha: float
    signals: tuple[SignalResult, ...]
    n_reference: int
    n_batch: int
    histogram_psi: dict[str, float] = field(default_factory=dict)  # pooled intensity histogram PSI per channel
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def drifted_signals(self) -> list[SignalResult]:
        return [s for s in self.signals if s.drifted]

    @property
    def min_p_value(self) -> float:
        return min((s.p_value for s in self.signals), default=1.0)

    def summary(self) -> str:
        if not self.drifted:
            return (f"no drift: {len(self.signals)} signals, smallest p-value {self.min_p_value:.3g} >= "
                    f"{self.alpha:g}/{len(self.signals)}")
        names = ", ".join(s.name for s in self.drifted_signals)
        return f"drift in {len(self.drifted_signals)} of {len(self.signals)} signals: {names}"

    def to_dict(self) -> dict[str, Any]:
        return {"drifted": self.drifted, "decision": "drift" if self.drifted else "no drift",
                "summary": self.summary(), "alpha": self.alpha, "correction": "bonferroni",
                "per_signal_threshold": self.alpha / max(len(self.signals), 1),
                "n_reference": self.n_reference, "n_batch": self.n_batch,
                "signals": [s.to_dict() for s in self.signals], "histogram_psi": dict(self.histogram_psi),
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriftReport:
        return cls(bool(d["drifted"]), float(d["alpha"]), tuple(SignalResult.from_dict(s) for s in d["signals"]),
                   int(d["n_reference"]), int(d["n_batch"]), dict(d.get("histogram_psi") or {}),
                   dict(d.get("settings") or {}))


def compare(ref: Profile, new: Profile, *, alpha: float = 0.01, n_perm: int = 200, seed: int = 0,
            min_psi: float = 0.1, max_rows: int = 512) -> DriftReport:
    """Test ``new`` against ``ref`` signal by signal; drift when any signal's p-value < ``alpha / k``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if ref.classes != new.classes:
        raise ValueError(f"class lists differ: reference {ref.classes}, batch {new.classes}")
    if ref.channels != new.channels:
        raise ValueError(f"channels differ: reference {ref.channels}, batch {new.channels}")
    if new.size == 0:
        raise ValueError("the batch is empty")
    names = ref.feature_names
    k = len(names) + 3
    thr = alpha / k
    out: list[SignalResult] = []
    for j, name in enumerate(names):
        d, p = ks(ref.features[:, j], new.features[:, j])
        e = psi(ref.features[:, j], new.features[:, j])
        out.append(SignalResult(name, "image", "KS", d, p, thr, bool(p < thr and e >= min_psi), e, "PSI"))
    mmd2, p, bw = mmd_permutation_test(ref.embeddings, new.embeddings, n_perm=n_perm, seed=seed, max_rows=max_rows)
    out.append(SignalResult("embeddings", "embedding", "MMD (RBF)", mmd2, p, thr, bool(p < thr)))
    chi2, p, tv = prediction_mix_test(ref.prediction_counts(), new.prediction_counts())
    out.append(SignalResult("prediction mix", "predictions", "chi-square", chi2, p, thr, bool(p < thr), tv,
                            "total variation"))
    d, p = ks(ref.confidence, new.confidence)
    out.append(SignalResult("confidence", "confidence", "KS", d, p, thr, bool(p < thr), d, "KS D"))
    hist_psi = {c: histogram_psi(ref.histograms[:, i].mean(0), new.histograms[:, i].mean(0))
                for i, c in enumerate(ref.channels)}
    return DriftReport(drifted=any(s.drifted for s in out), alpha=alpha, signals=tuple(out), n_reference=ref.size,
                       n_batch=new.size, histogram_psi=hist_psi,
                       settings={"n_perm": n_perm, "seed": seed, "min_psi": min_psi, "max_rows": max_rows,
                                 "mmd_bandwidth": bw})


def pca_2d(ref: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both embedding sets projected on the reference's first two principal components (for the report)."""
    ref = np.asarray(ref, np.float64)
    new = np.asarray(new, np.float64)
    mu = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref - mu, full_matrices=False)
    basis = vt[:2].T if vt.shape[0] >= 2 else np.eye(ref.shape[1], 2)
    return (ref - mu) @ basis, (new - mu) @ basis
