"""Tests for evaluation.gates: every gate passing, each failing on its own, overrides, champion and latency."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import pytest

from defectops.evaluation.gates import GateConfig, GateReport, GateResult, evaluate_gates
from defectops.evaluation.metrics import ClassificationMetrics, classification_metrics

CLASSES = ("false_call", "open", "short")


def from_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str] = CLASSES) -> ClassificationMetrics:
    """Metrics of a classifier with exactly this confusion matrix (rows = true, cols = predicted)."""
    cm_arr = np.asarray(cm)
    n = len(classes)
    y_true, y_pred = [], []
    for i in range(n):
        for j in range(n):
            y_true += [i] * int(cm_arr[i, j])
            y_pred += [j] * int(cm_arr[i, j])
    probs = np.full((len(y_pred), n), 0.1)
    probs[np.arange(len(y_pred)), y_pred] = 0.9
    return classification_metrics(np.array(y_true), probs, classes, "false_call")


# Candidate used throughout:
#   false_call [90, 8, 2]  recall 0.90, false-call rate 10/100 = 0.10
#   open       [ 1, 48, 1] recall 0.96
#   short      [ 1, 1, 48] recall 0.96
#   escape rate 2/100 = 0.02; macro recall (0.90 + 0.96 + 0.96) / 3 = 0.94  -> passes every default gate
BASE = [[90, 8, 2], [1, 48, 1], [1, 1, 48]]


@pytest.fixture
def candidate() -> ClassificationMetrics:
    return from_confusion(BASE)


def names(results: Sequence[GateResult]) -> list[str]:
    return [r.name for r in results]


def test_all_pass_with_defaults(candidate: ClassificationMetrics) -> None:
    assert candidate.macro_recall == pytest.approx(0.94)
    assert candidate.escape_rate == pytest.approx(0.02)
    assert candidate.false_call_rate == pytest.approx(0.10)
    report = evaluate_gates(candidate, GateConfig())
    assert report.passed
    assert report.failed() == ()
    assert names(report.results) == [
        "macro_recall",
        "recall[false_call]",
        "recall[open]",
        "recall[short]",
        "escape_rate",
        "false_call_rate",
    ]
    by_name = {r.name: r for r in report.results}
    assert by_name["macro_recall"].comparison == ">="
    assert by_name["escape_rate"].comparison == "<="
    assert by_name["recall[open]"].value == pytest.approx(0.96)
    assert by_name["recall[open]"].threshold == 0.80


@pytest.mark.parametrize(
    ("cfg", "failing"),
    [
        (GateConfig(min_macro_recall=0.95), "macro_recall"),
        (GateConfig(min_class_recall=0.92), "recall[false_call]"),  # 0.90 < 0.92, the others are 0.96
        (GateConfig(max_escape_rate=0.01), "escape_rate"),  # 0.02 > 0.01
        (GateConfig(max_false_call_rate=0.05), "false_call_rate"),  # 0.10 > 0.05
        (GateConfig(class_recall={"open": 0.97}), "recall[open]"),  # override tighter than the default
    ],
    ids=["macro", "class", "escape", "false-call", "override"],
)
def test_each_gate_fails_individually(candidate: ClassificationMetrics, cfg: GateConfig, failing: str) -> None:
    report = evaluate_gates(candidate, cfg)
    assert not report.passed
    assert names(report.failed()) == [failing]
    failed = report.failed()[0]
    assert failed.value is not None
    assert "below" in failed.detail or "exceeds" in failed.detail


def test_override_can_relax_a_class(candidate: ClassificationMetrics) -> None:
    # default 0.95 would fail false_call (0.90); the override 0.85 lets it pass and is the reported threshold
    report = evaluate_gates(
        candidate, GateConfig(min_macro_recall=0.9, min_class_recall=0.95, class_recall={"false_call": 0.85})
    )
    assert report.passed
    assert {r.name: r.threshold for r in report.results}["recall[false_call]"] == 0.85


def test_unknown_class_in_override_raises_naming_it(candidate: ClassificationMetrics) -> None:
    with pytest.raises(ValueError, match=r"unknown classes \['bridge', 'solder'\]"):
        evaluate_gates(candidate, GateConfig(class_recall={"solder": 0.9, "open": 0.9, "bridge": 0.5}))


@pytest.mark.parametrize(
    "cfg",
    [GateConfig(min_class_recall=1.5), GateConfig(max_escape_rate=-0.1), GateConfig(max_latency_ms=0.0)],
    ids=["recall>1", "negative-rate", "zero-latency"],
)
def test_invalid_thresholds_raise(candidate: ClassificationMetrics, cfg: GateConfig) -> None:
    with pytest.raises(ValueError, match="GateConfig"):
        evaluate_gates(candidate, cfg)


def test_class_without_support_fails(candidate: ClassificationMetrics) -> None:
    # no "short" samples at all: its recall gate fails with value None, everything else passes
    m = from_confusion([[90, 10, 0], [2, 48, 0], [0, 0, 0]])
    report = evaluate_gates(m, GateConfig())
    assert names(report.failed()) == ["recall[short]"]
    short = report.failed()[0]
    assert short.value is None
    assert short.detail == "no samples of class short in the evaluation set"


def test_no_regression_gates_against_champion(candidate: ClassificationMetrics) -> None:
    # champion: open recall 50/50 = 1.0, others as the candidate -> macro (0.9 + 1 + 0.96) / 3 = 0.9533
    #   candidate open 0.96 < 1.0 - 0.02 = 0.98                 -> no_regression:recall[open] fails
    #   candidate macro 0.94 >= 0.9533 - 0.02 = 0.9333           -> passes
    champion = from_confusion([[90, 8, 2], [0, 50, 0], [1, 1, 48]])
    report = evaluate_gates(candidate, GateConfig(), champion=champion)
    assert names(report.results)[-4:] == [
        "no_regression:macro_recall",
        "no_regression:recall[false_call]",
        "no_regression:recall[open]",
        "no_regression:recall[short]",
    ]
    assert names(report.failed()) == ["no_regression:recall[open]"]
    failed = report.failed()[0]
    assert failed.metric == "recall[open]"
    assert failed.threshold == pytest.approx(0.98)
    assert "champion 1.0000" in failed.detail


def test_drop_exactly_at_the_allowed_regression_passes(candidate: ClassificationMetrics) -> None:
    # champion open recall 49/50 = 0.98; candidate 0.96 == 0.98 - 0.02 (up to float rounding) -> pass
    champion = from_confusion([[90, 8, 2], [1, 49, 0], [1, 1, 48]])
    report = evaluate_gates(candidate, GateConfig(), champion=champion)
    assert report.passed


def test_regression_skipped_for_class_champion_never_saw(candidate: ClassificationMetrics) -> None:
    champion = from_confusion([[90, 10, 0], [2, 48, 0], [0, 0, 0]])  # no short samples for the champion
    report = evaluate_gates(candidate, GateConfig(), champion=champion)
    assert "no_regression:recall[short]" not in names(report.results)
    assert "no_regression:recall[open]" in names(report.results)


def test_latency_gate_skipped_used_and_failing(candidate: ClassificationMetrics) -> None:
    assert "latency" not in names(evaluate_gates(candidate, GateConfig(), latency_ms=3.0).results)
    assert "latency" not in names(evaluate_gates(candidate, GateConfig(max_latency_ms=5.0)).results)
    ok = evaluate_gates(candidate, GateConfig(max_latency_ms=5.0), latency_ms=3.0)
    assert ok.passed
    assert ok.results[-1].name == "latency"
    assert ok.results[-1].metric == "latency_ms"
    slow = evaluate_gates(candidate, GateConfig(max_latency_ms=5.0), latency_ms=7.5)
    assert names(slow.failed()) == ["latency"]
    assert slow.failed()[0].comparison == "<="


def test_report_roundtrip_through_json(candidate: ClassificationMetrics) -> None:
    m = from_confusion([[90, 10, 0], [2, 48, 0], [0, 0, 0]])  # includes a None value
    report = evaluate_gates(m, GateConfig(max_latency_ms=5.0), champion=candidate, latency_ms=4.0)
    d = report.to_dict()
    back = GateReport.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back == report
    assert back.to_dict() == d


def test_gate_results_are_frozen(candidate: ClassificationMetrics) -> None:
    report = evaluate_gates(candidate, GateConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.results[0].passed = False  # type: ignore[misc]


def test_gate_config_is_a_valid_structured_config() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    base = omegaconf.OmegaConf.structured(GateConfig)
    merged = omegaconf.OmegaConf.merge(base, {"class_recall": {"open": 0.95}, "max_latency_ms": 4.0})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, GateConfig)
    assert cfg.class_recall == {"open": 0.95}
    assert cfg.max_latency_ms == 4.0
    assert [f.name for f in dataclasses.fields(GateConfig)] == [
        "min_macro_recall",
        "min_class_recall",
        "class_recall",
        "max_escape_rate",
        "max_false_call_rate",
        "max_regression",
        "max_latency_ms",
        "min_board_map",
        "min_board_fscore",
        "use_upper_bound",
        "confidence",
    ]


def test_board_gates() -> None:
    m = classification_metrics(np.array([0, 1]), np.eye(2), ["false_call", "open"], "false_call")
    cfg = GateConfig(min_board_map=0.9, min_board_fscore=0.95)
    report = evaluate_gates(m, cfg, board={"map": 0.93, "fscore": 0.94})
    by_name = {r.name: r for r in report.results}
    assert by_name["board_map"].passed
    assert not by_name["board_fscore"].passed
    missing = {r.name: r for r in evaluate_gates(m, cfg).results}
    assert not missing["board_map"].passed
    assert "not measured" in missing["board_map"].detail
    assert "board_map" not in {r.name for r in evaluate_gates(m, GateConfig()).results}


# -- gates.use_upper_bound: the Wilson upper bound of the rates against their limits ---------------------------------


def test_zero_escapes_of_twenty_defects_pass_on_the_point_but_not_on_the_bound() -> None:
    m = from_confusion([[100, 0, 0], [0, 10, 0], [0, 0, 10]])  # 0 of 20 defects called good
    point = {r.name: r for r in evaluate_gates(m, GateConfig()).results}["escape_rate"]
    assert point.passed and point.value == 0.0 and not point.uses_bound
    assert point.interval is not None and point.interval.high == pytest.approx(0.1611, abs=5e-5)
    assert "0 of 20 defects called good" in point.detail and "95 % Wilson interval [0.0000, 0.1611]" in point.detail
    bound = {r.name: r for r in evaluate_gates(m, GateConfig(use_upper_bound=True)).results}["escape_rate"]
    assert not bound.passed and bound.uses_bound
    assert bound.value == pytest.approx(0.1611, abs=5e-5) and bound.threshold == 0.05
    assert "upper bound 0.1611 exceeds the maximum 0.0500" in bound.detail and "0 of 20" in bound.detail


def test_zero_escapes_of_two_thousand_defects_pass_both_ways() -> None:
    m = from_confusion([[2000, 0, 0], [0, 1000, 0], [0, 0, 1000]])
    for cfg in (GateConfig(), GateConfig(use_upper_bound=True)):
        report = evaluate_gates(m, cfg)
        assert report.passed
    bound = {r.name: r for r in evaluate_gates(m, GateConfig(use_upper_bound=True)).results}["escape_rate"]
    assert bound.value == pytest.approx(0.00192, abs=5e-6) and bound.interval is not None
    assert bound.interval.n == 2000


def test_false_call_bound_and_confidence_level(candidate: ClassificationMetrics) -> None:
    # 10 of 100 good flagged: point 0.10, 95 % Wilson upper 0.1744, 99 % upper 0.2038
    def fc(cfg: GateConfig) -> GateResult:
        return {r.name: r for r in evaluate_gates(candidate, cfg).results}["false_call_rate"]

    assert fc(GateConfig(max_false_call_rate=0.18)).passed
    assert fc(GateConfig(max_false_call_rate=0.18, use_upper_bound=True)).passed
    strict = fc(GateConfig(max_false_call_rate=0.18, use_upper_bound=True, confidence=0.99))
    assert not strict.passed and strict.value == pytest.approx(0.2038, abs=5e-4) and "99 %" in strict.detail
    with pytest.raises(ValueError, match=r"GateConfig\.confidence"):
        evaluate_gates(candidate, GateConfig(confidence=1.0))


def test_bound_without_trials_keeps_the_point() -> None:
    m = from_confusion([[50, 0, 0], [0, 0, 0], [0, 0, 0]])  # no defects at all: nothing can escape
    escape = {r.name: r for r in evaluate_gates(m, GateConfig(use_upper_bound=True)).results}["escape_rate"]
    assert escape.passed and escape.value == 0.0 and not escape.uses_bound
    assert escape.interval is not None and not escape.interval.defined


def test_gate_json_stays_backward_compatible(candidate: ClassificationMetrics) -> None:
    report = evaluate_gates(candidate, GateConfig(use_upper_bound=True))
    d = report.to_dict()
    old_keys = {"name", "metric", "value", "threshold", "comparison", "passed", "detail"}
    assert all(old_keys <= set(r) for r in d["results"])
    assert GateReport.from_dict(json.loads(json.dumps(d, allow_nan=False))) == report
    old = {"passed": True, "results": [{k: v for k, v in r.items() if k in old_keys} for r in d["results"]]}
    back = GateReport.from_dict(old)  # a gates.json written before intervals existed
    assert all(r.interval is None and not r.uses_bound for r in back.results)
