"""Shortcut check: can a trivial model predict the class from metadata alone (image size, file type, box size)?

What: :func:`shortcut_check` takes one row of metadata per training sample (arrays in, no I/O) and fits a shallow
decision tree (depth 3, class-balanced) with stratified k-fold cross-validation. It reports the cross-validated
balanced accuracy, the chance level (``1 / n_classes``), the chance-corrected score
``(balanced_accuracy - chance) / (1 - chance)`` (0 = chance, 1 = perfect), the same score for each feature on its own,
the metadata model's recall per class, and whether to warn.

Why: when one class was photographed at another resolution, saved as JPEG instead of PNG or cut from larger boxes, a
CNN can reach a high test score by learning that instead of the defect, and it fails on the line where the metadata no
longer differs. A depth-3 tree needs only a few thresholds, so if it predicts the class well, the shortcut is easy
enough for any network to find.

Threshold: warn when the chance-corrected score is at least ``warn_at`` (default 0.5): metadata gets the model at
least halfway from guessing to perfect. The correction makes the bar the same for 2 and for 7 classes (a raw
balanced accuracy of 0.6 is little for two classes and a lot for seven). On metadata independent of the class the
score scatters around 0 (its spread shrinks with the number of samples per class); 0.5 sits far above that scatter
for the sample counts the check runs on, while a real size or format split scores near 1.

Small data: classes with fewer samples than ``folds`` are left out (each fold needs one sample of every class), and
the check is skipped, with a ``note`` and never a warning, when fewer than two classes remain or every feature is
constant. Feature columns named ``<feature>=<value>`` (one-hot, e.g. ``format=PNG``) are scored together as one
feature ``<feature>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_FIX", "DEFAULT_WARN_AT", "ShortcutReport", "feature_groups", "shortcut_check"]

DEFAULT_WARN_AT = 0.5
DEFAULT_FIX = ("the model can learn crop size or file type instead of the defect; use data.fit_mode=resize|center_crop "
               "or normalise formats")
MAX_DEPTH = 3


@dataclass(frozen=True)
class ShortcutReport:
    """Outcome of :func:`shortcut_check`; scores are ``None`` when the check was skipped (see ``note``).

    ``score`` and ``per_feature`` are chance-corrected balanced accuracies (0 = chance, 1 = perfect);
    ``per_class_recall`` is the metadata model's cross-validated recall for each class checked.
    """

    features: list[str] = field(default_factory=list)
    n_samples: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    folds: int = 5
    warn_at: float = DEFAULT_WARN_AT
    balanced_accuracy: float | None = None
    chance: float | None = None
    score: float | None = None
    top_feature: str | None = None
    top_feature_score: float | None = None
    per_feature: dict[str, float] = field(default_factory=dict)
    per_class_recall: dict[str, float] = field(default_factory=dict)
    warn: bool = False
    message: str = ""
    note: str = ""

    @property
    def checked(self) -> bool:
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShortcutReport:
        """The report from :meth:`to_dict`'s output; unknown keys are ignored, missing ones take their defaults."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def feature_groups(feature_names: Sequence[str]) -> dict[str, list[int]]:
    """Column indices per feature, in first-seen order: ``format=PNG`` and ``format=JPEG`` are feature ``format``."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(feature_names):
        groups.setdefault(name.split("=", 1)[0], []).append(i)
    return groups


def _corrected(ba: float, chance: float) -> float:
    return (ba - chance) / (1.0 - chance)


def _cv_predict(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(max_depth=MAX_DEPTH, class_weight="balanced", random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return np.asarray(cross_val_predict(tree, x, y, cv=cv))


def _recalls(y: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> list[float]:
    return [float(np.mean(pred[y == k] == k)) for k in labels]


def shortcut_check(features: np.ndarray, feature_names: Sequence[str], y: np.ndarray, classes: Sequence[str], *,
                   folds: int = 5, seed: int = 0, warn_at: float = DEFAULT_WARN_AT,
                   fix: str = DEFAULT_FIX) -> ShortcutReport:
    """How well a depth-3 decision tree predicts ``y`` (indices into ``classes``) from ``features`` (N x F, finite).

    ``fix`` is the advice the warning ``message`` ends with. See the module docstring for the score, the threshold
    and the small-data rules. ``ValueError`` for inconsistent shapes, non-finite features or labels outside
    ``classes``; data too small or too uniform to judge gives a report with a ``note`` and no warning.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y)
    names = [str(n) for n in feature_names]
    if x.ndim != 2 or x.shape[1] != len(names) or y.shape != (x.shape[0],):
        raise ValueError(f"features {x.shape}, {len(names)} names and labels {y.shape} do not match: "
                         "pass an (N, F) array, F names and N labels")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values: pass finite metadata")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f"labels must be integer indices into the {len(classes)} classes")
    if folds < 2:
        raise ValueError(f"folds={folds}: use at least 2")
    counts = np.bincount(y.astype(np.int64), minlength=len(classes)) if y.size else np.zeros(len(classes), int)
    class_counts = {c: int(n) for c, n in zip(classes, counts, strict=True) if n}
    base: dict[str, Any] = {"features": list(feature_groups(names)), "n_samples": int(y.size),
                            "class_counts": class_counts, "folds": folds, "warn_at": warn_at}
    kept = [k for k in range(len(classes)) if counts[k] >= folds]
    small = [classes[k] for k in range(len(classes)) if 0 < counts[k] < folds]
    left_out = (f"left out {', '.join(small)} (fewer than {folds} samples each)" if small else "")
    if len(kept) < 2:
        why = ("no samples" if not y.size else "only one class" if len(class_counts) == 1
               else f"fewer than two classes with {folds} or more samples")
        return ShortcutReport(**base, note=f"not checked: {why}" + (f"; {left_out}" if left_out else ""))
    rows = np.isin(y, kept)
    x, y = x[rows], y[rows]
    varying = [j for j in range(x.shape[1]) if np.ptp(x[:, j]) > 0]
    if not varying:
        return ShortcutReport(**base, note="not checked: every metadata feature is the same for all samples, so "
                                           "none can stand in for the class" + (f"; {left_out}" if left_out else ""))
    chance = 1.0 / len(kept)
    pred = _cv_predict(x[:, varying], y, folds, seed)
    recalls = _recalls(y, pred, kept)
    ba = float(np.mean(recalls))
    score = _corrected(ba, chance)
    per_feature: dict[str, float] = {}
    for name, cols in feature_groups(names).items():
        cols = [j for j in cols if j in varying]
        if cols:
            per_feature[name] = _corrected(float(np.mean(_recalls(y, _cv_predict(x[:, cols], y, folds, seed), kept))),
                                           chance)
        else:
            per_feature[name] = 0.0
    top = max(per_feature, key=lambda k: per_feature[k])
    warn = score >= warn_at
    strong = [k for k, v in sorted(per_feature.items(), key=lambda kv: -kv[1]) if v >= warn_at] or [top]
    figures = (f"balanced accuracy {ba:.2f} from metadata alone (chance {chance:.2f}, chance-corrected {score:.2f} "
               f"{'>=' if warn else '<'} {warn_at:.2f}; best single feature: {top} {per_feature[top]:.2f})")
    message = (f"{', '.join(strong)} predict{'s' if len(strong) == 1 else ''} the class: {figures}; {fix}"
               if warn else f"metadata does not predict the class: {figures}")
    return ShortcutReport(**base, balanced_accuracy=ba, chance=chance, score=score, top_feature=top,
                          top_feature_score=per_feature[top], per_feature=per_feature,
                          per_class_recall={classes[k]: r for k, r in zip(kept, recalls, strict=True)},
                          warn=warn, message=message, note=left_out)
