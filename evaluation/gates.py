"""Release gates: may this model replace the champion on the line?

What: :func:`evaluate_gates` turns :class:`~evaluation.metrics.ClassificationMetrics` (plus, optionally, the
champion's metrics on the same evaluation set and a measured per-crop latency) into a :class:`GateReport` with
one :class:`GateResult` per check:

- ``macro_recall``            macro recall >= ``min_macro_recall``;
- ``recall[<class>]``         recall of every class (the good class included) >= its threshold,
                              ``class_recall[<class>]`` when given, else ``min_class_recall``. A class with no
                              samples in the evaluation set fails: an unevaluated class must not pass silently;
- ``escape_rate``             <= ``max_escape_rate``;
- ``false_call_rate``         <= ``max_false_call_rate``. With ``use_upper_bound`` these two compare the Wilson
                              upper bound at ``confidence`` (:func:`evaluation.intervals.wilson_interval` of the counts
                              in ``metrics.confusion``) instead of the point value, so that a small test set cannot
                              pass a model by luck (0 escapes of 20 defects: point 0, 95 % upper bound 0.16); the
                              result's ``value`` is then the bound, ``interval`` holds point and bounds either way;
- ``no_regression:macro_recall`` and ``no_regression:recall[<class>]`` (only with a champion): the candidate
                              may lose at most ``max_regression`` against the champion. Skipped for a class the
                              champion has no recall for (absent from its classes or without support), since
                              there is no baseline; a candidate class without support already fails above;
- ``latency``                 per-crop latency <= ``max_latency_ms``; skipped when the budget is ``None`` or no
                              latency is given.

Why: promotion must be decided by explicit, logged, individually explainable checks rather than one score.
Everything here is pure (no I/O). Comparisons allow a 1e-9 tolerance so that e.g. ``0.88 >= 0.90 - 0.02``
holds despite floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from defectops.evaluation.intervals import Interval, error_counts, wilson_interval
from defectops.evaluation.metrics import ClassificationMetrics

__all__ = ["GateConfig", "GateReport", "GateResult", "evaluate_gates"]

_TOL = 1e-9


@dataclass
class GateConfig:
    """Thresholds of the release gates (a Hydra structured-config group; field names are part of the config API).

    Rates and recalls are fractions in ``[0, 1]``; ``class_recall`` maps class names to a per-class minimum
    recall that overrides ``min_class_recall``; ``max_regression`` is the allowed drop of macro recall and of any
    class recall against the champion; ``max_latency_ms`` is the per-crop latency budget (``None`` = no gate).
    ``use_upper_bound``: the escape-rate and false-call-rate gates compare the Wilson upper bound at ``confidence``
    (a two-sided level, e.g. 0.95) with their limit instead of the measured rate.
    """

    min_macro_recall: float = 0.90
    min_class_recall: float = 0.80
    class_recall: dict[str, float] = field(default_factory=dict)
    max_escape_rate: float = 0.05
    max_false_call_rate: float = 0.25
    max_regression: float = 0.02
    max_latency_ms: float | None = None
    min_board_map: float | None = None
    min_board_fscore: float | None = None
    use_upper_bound: bool = False
    confidence: float = 0.95


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate: ``value <comparison> threshold`` with ``comparison`` in ``{">=", "<="}``.

    ``value`` is ``None`` when the metric could not be measured (then ``passed`` is ``False``). ``interval`` is the
    metric's confidence interval where one is computed (the rates); ``uses_bound`` says that ``value`` is its upper
    bound rather than the measured rate (``GateConfig.use_upper_bound``).
    """

    name: str
    metric: str
    value: float | None
    threshold: float
    comparison: str
    passed: bool
    detail: str
    interval: Interval | None = None
    uses_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``interval`` and ``uses_bound`` are additions; older readers ignore them)."""
        return {
            "name": self.name,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "comparison": self.comparison,
            "passed": self.passed,
            "detail": self.detail,
            "interval": None if self.interval is None else self.interval.to_dict(),
            "uses_bound": self.uses_bound,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        """Inverse of :meth:`to_dict`."""
        value = d["value"]
        return cls(
            name=str(d["name"]),
            metric=str(d["metric"]),
            value=None if value is None else float(value),
            threshold=float(d["threshold"]),
            comparison=str(d["comparison"]),
            passed=bool(d["passed"]),
            detail=str(d["detail"]),
            interval=Interval.from_dict(d["interval"]) if d.get("interval") else None,
            uses_bound=bool(d.get("uses_bound", False)),
        )


@dataclass(frozen=True)
class GateReport:
    """All gate results; ``passed`` is true only when every gate passed."""

    passed: bool
    results: tuple[GateResult, ...]

    def failed(self) -> tuple[GateResult, ...]:
        """The gates that did not pass, in evaluation order."""
        return tuple(r for r in self.results if not r.passed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"passed": self.passed, "results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateReport:
        """Inverse of :meth:`to_dict`."""
        return cls(passed=bool(d["passed"]), results=tuple(GateResult.from_dict(r) for r in d["results"]))


def _fmt(x: float, unit: str = "") -> str:
    return f"{x:.2f} {unit}" if unit else f"{x:.4f}"


def _check(
    name: str, metric: str, value: float, threshold: float, comparison: str, what: str, unit: str = ""
) -> GateResult:
    """Compare a measured value against a threshold and explain the outcome in ``detail``."""
    if comparison == ">=":
        passed = value >= threshold - _TOL
        verdict = "meets" if passed else "is below"
        bound = "minimum"
    else:
        passed = value <= threshold + _TOL
        verdict = "is within" if passed else "exceeds"
        bound = "maximum"
    detail = f"{what} {_fmt(value, unit)} {verdict} the {bound} {_fmt(threshold, unit)}"
    return GateResult(name, metric, float(value), float(threshold), comparison, passed, detail)


def _rate_check(name: str, value: float, limit: float, counts: tuple[int, int], what: str, events: str, unit: str,
                cfg: GateConfig) -> GateResult:
    """A ``<=`` gate on a rate, compared on its Wilson upper bound when ``cfg.use_upper_bound``; ``detail`` gives the
    counts and the interval either way."""
    k, n = counts
    iv = wilson_interval(k, n, cfg.confidence, unit=unit)
    level = f"{100 * cfg.confidence:g} %"
    measured = f"{k} of {n} {events}"
    if not cfg.use_upper_bound:
        base = _check(name, name, value, limit, "<=", what)
        extra = f" ({measured}; {level} Wilson interval {iv.format_bounds(4)})" if iv.defined else f" ({measured})"
        return GateResult(name, name, base.value, base.threshold, "<=", base.passed, base.detail + extra, iv)
    if not iv.defined:  # nothing to escape or to falsely call: the bound is not defined, the point (0) stands
        base = _check(name, name, value, limit, "<=", what)
        return GateResult(name, name, base.value, base.threshold, "<=", base.passed,
                          base.detail + f" ({measured}: no {level} upper bound without samples)", iv, False)
    passed = iv.high <= limit + _TOL
    verdict = "is within" if passed else "exceeds"
    detail = (f"{what} {_fmt(value)} ({measured}): its {level} Wilson upper bound {_fmt(iv.high)} {verdict} the "
              f"maximum {_fmt(limit)} (gates.use_upper_bound)")
    return GateResult(name, name, float(iv.high), float(limit), "<=", passed, detail, iv, True)


def _validate_config(cfg: GateConfig, classes: tuple[str, ...]) -> None:
    unknown = sorted(set(cfg.class_recall) - set(classes))
    if unknown:
        raise ValueError(f"GateConfig.class_recall names unknown classes {unknown}; known classes: {list(classes)}")
    fractions = {
        "min_macro_recall": cfg.min_macro_recall,
        "min_class_recall": cfg.min_class_recall,
        "max_escape_rate": cfg.max_escape_rate,
        "max_false_call_rate": cfg.max_false_call_rate,
        "max_regression": cfg.max_regression,
        **{f"class_recall[{c}]": v for c, v in cfg.class_recall.items()},
    }
    bad = {k: v for k, v in fractions.items() if not 0.0 <= float(v) <= 1.0}  # NaN fails this test too
    if bad:
        raise ValueError(f"GateConfig values must be fractions in [0, 1], got {bad}")
    if not 0.0 < float(cfg.confidence) < 1.0:
        raise ValueError(f"GateConfig.confidence must lie strictly between 0 and 1 (e.g. 0.95), got {cfg.confidence}")
    if cfg.max_latency_ms is not None and not float(cfg.max_latency_ms) > 0:
        raise ValueError(f"GateConfig.max_latency_ms must be positive or None, got {cfg.max_latency_ms}")


def evaluate_gates(
    metrics: ClassificationMetrics,
    cfg: GateConfig,
    *,
    champion: ClassificationMetrics | None = None,
    latency_ms: float | None = None,
    board: Mapping[str, float] | None = None,
) -> GateReport:
    """Evaluate every release gate (listed in the module docstring) for a candidate model.

    Inputs: ``metrics`` of the candidate; ``cfg`` thresholds; ``champion`` the current production model's metrics
    on the same evaluation set (enables the no-regression gates); ``latency_ms`` the measured per-crop latency;
    ``board`` board-level DeepPCB scores (``map``, ``fscore``) for the board gates, which fail when configured but
    not measured.
    Raises ``ValueError`` when ``cfg.class_recall`` names classes unknown to ``metrics`` or thresholds are out of
    range.
    """
    _validate_config(cfg, metrics.classes)
    results: list[GateResult] = []

    results.append(
        _check("macro_recall", "macro_recall", metrics.macro_recall, cfg.min_macro_recall, ">=", "macro recall")
    )

    for c in metrics.classes:
        key = f"recall[{c}]"
        threshold = float(cfg.class_recall.get(c, cfg.min_class_recall))
        recall = metrics.per_class_recall.get(c, math.nan)
        if metrics.support.get(c, 0) == 0 or math.isnan(recall):
            detail = f"no samples of class {c} in the evaluation set"
            results.append(GateResult(key, key, None, threshold, ">=", False, detail))
        else:
            results.append(_check(key, key, recall, threshold, ">=", f"recall of {c}"))

    counts = error_counts(metrics)
    results.append(_rate_check("escape_rate", metrics.escape_rate, cfg.max_escape_rate, counts["escape_rate"],
                               "escape rate", "defects called good", "defects", cfg))
    results.append(_rate_check("false_call_rate", metrics.false_call_rate, cfg.max_false_call_rate,
                               counts["false_call_rate"], "false-call rate", "good candidates flagged", "good", cfg))

    if champion is not None:
        floor = champion.macro_recall - cfg.max_regression
        what = f"macro recall (champion {_fmt(champion.macro_recall)}, allowed drop {_fmt(cfg.max_regression)})"
        results.append(_check("no_regression:macro_recall", "macro_recall", metrics.macro_recall, floor, ">=", what))
        for c in metrics.classes:
            key = f"recall[{c}]"
            mine = metrics.per_class_recall.get(c, math.nan)
            theirs = champion.per_class_recall.get(c, math.nan)
            if math.isnan(mine) or math.isnan(theirs):
                continue  # no baseline, or the candidate already fails its recall gate
            what = f"recall of {c} (champion {_fmt(theirs)}, allowed drop {_fmt(cfg.max_regression)})"
            results.append(_check(f"no_regression:{key}", key, mine, theirs - cfg.max_regression, ">=", what))

    if cfg.max_latency_ms is not None and latency_ms is not None:
        results.append(
            _check(
                "latency", "latency_ms", float(latency_ms), float(cfg.max_latency_ms), "<=", "latency per crop", "ms"
            )
        )

    for key, minimum, what in (("map", cfg.min_board_map, "board-level mAP"),
                               ("fscore", cfg.min_board_fscore, "board-level F-score")):
        if minimum is None:
            continue
        if board is None or board.get(key) is None:
            results.append(GateResult(f"board_{key}", f"board_{key}", None, float(minimum), ">=", False,
                                      f"{what} was not measured (no board-level evaluation for this dataset)"))
        else:
            results.append(_check(f"board_{key}", f"board_{key}", float(board[key]), float(minimum), ">=", what))

    out = tuple(results)
    return GateReport(passed=all(r.passed for r in out), results=out)
