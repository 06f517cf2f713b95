"""Tests for evaluation.intervals: Wilson against the textbook formula and scipy, bootstraps over groups and boards."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy.stats import binomtest

from defectops.evaluation.deeppcb import Detection, GroundTruth, score
from defectops.evaluation.intervals import (
    BoardIntervals,
    ClassificationIntervals,
    Interval,
    board_breakdown,
    bootstrap_board_scores,
    bootstrap_macro_recall,
    classification_intervals,
    match_boards,
    weighted_board_scores,
    wilson_interval,
)
from defectops.evaluation.metrics import ClassificationMetrics, classification_metrics

CLASSES = ("false_call", "open", "short")


def textbook_wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


# -- Wilson -------------------------------------------------------------------------------------------------------


def test_wilson_known_values() -> None:
    zero = wilson_interval(0, 10)
    assert (zero.point, zero.low) == (0.0, 0.0)
    assert zero.high == pytest.approx(0.2775, abs=5e-5)  # the published table value for 0 of 10 at 95 %
    assert wilson_interval(10, 10).high == 1.0
    assert wilson_interval(10, 10).low == pytest.approx(1 - 0.2775, abs=5e-5)
    assert wilson_interval(0, 20).high == pytest.approx(0.1611, abs=5e-5)
    assert wilson_interval(0, 2000).high == pytest.approx(0.00192, abs=5e-6)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 3), (7, 10), (13, 40), (250, 251), (480, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_textbook_and_scipy(k: int, n: int, confidence: float) -> None:
    iv = wilson_interval(k, n, confidence)
    z = {0.9: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}[confidence]
    low, high = textbook_wilson(k, n, z)
    assert iv.low == pytest.approx(max(low, 0.0), abs=1e-12)
    assert iv.high == pytest.approx(min(high, 1.0), abs=1e-12)
    ref = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
    assert iv.point == k / n and iv.n == n and iv.method == "wilson" and iv.confidence == confidence


def test_wilson_undefined_and_bad_input() -> None:
    empty = wilson_interval(0, 0, unit="defects")
    assert not empty.defined and empty.n == 0 and math.isnan(empty.point) and empty.format() == "n/a"
    assert empty.to_dict()["low"] is None
    for k, n in ((-1, 5), (6, 5), (1.5, 3)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(k, n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 5, 1.0)


def test_interval_json_and_format() -> None:
    iv = Interval(0.9871, 0.9752, 0.99421, 0.95, "bootstrap", 200, "boards")
    assert iv.format() == "0.987 [0.975, 0.994]"
    assert iv.format_bounds(2) == "[0.98, 0.99]"
    assert iv.describe() == "95 % bootstrap, n = 200 boards"
    back = Interval.from_dict(json.loads(json.dumps(iv.to_dict(), allow_nan=False)))
    assert back == iv
    assert Interval.from_dict({k: v for k, v in iv.to_dict().items() if k != "unit"}).unit == ""


# -- classification -----------------------------------------------------------------------------------------------


def from_confusion(cm: list[list[int]]) -> tuple[ClassificationMetrics, np.ndarray, np.ndarray]:
    y_true = np.repeat(np.arange(len(cm)), [sum(r) for r in cm])
    y_pred = np.concatenate([np.repeat(np.arange(len(cm)), r) for r in cm])
    probs = np.eye(len(cm))[y_pred]
    return classification_metrics(y_true, probs, CLASSES, "false_call"), y_true, y_pred


def test_classification_intervals_from_the_confusion_matrix() -> None:
    # false_call [90, 8, 2]: false calls flagged 10 of 100; open [1, 48, 1]; short [3, 1, 46]: escapes 1 + 3 of 100
    m, _, _ = from_confusion([[90, 8, 2], [1, 48, 1], [3, 1, 46]])
    iv = classification_intervals(m)
    assert iv.escape_rate == wilson_interval(4, 100, unit="defects")
    assert iv.escape_rate.point == pytest.approx(m.escape_rate)
    assert iv.false_call_rate == wilson_interval(10, 100, unit="good")
    assert iv.false_call_rate.point == pytest.approx(m.false_call_rate)
    assert iv.per_class_recall["short"] == wilson_interval(46, 50, unit="samples")
    assert iv.macro_recall is None
    back = ClassificationIntervals.from_dict(json.loads(json.dumps(iv.to_dict(), allow_nan=False)))
    assert back == iv


def test_class_without_samples_and_no_defects_are_undefined() -> None:
    m, _, _ = from_confusion([[10, 0, 0], [0, 0, 0], [0, 0, 0]])
    iv = classification_intervals(m)
    assert not iv.per_class_recall["open"].defined and not iv.escape_rate.defined
    assert iv.false_call_rate.defined


def test_metrics_json_with_intervals_still_loads_and_old_files_get_wilson() -> None:
    m, _, _ = from_confusion([[90, 8, 2], [1, 48, 1], [3, 1, 46]])
    iv = classification_intervals(m, 0.9)
    with_key = {**m.to_dict(), "intervals": iv.to_dict()}
    assert ClassificationMetrics.from_dict(with_key) == m  # extra keys are ignored
    assert ClassificationIntervals.of_metrics_dict(with_key) == iv
    old = ClassificationIntervals.of_metrics_dict(m.to_dict())
    assert old == classification_intervals(m)  # recomputed from the registered counts, no macro recall
    assert ClassificationIntervals.of_metrics_dict({"classes": ["a"]}) is None


def test_bootstrap_macro_recall_is_deterministic_and_contains_the_point() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 600)
    pred = np.where(rng.random(600) < 0.85, y, rng.integers(0, 3, 600))
    m = classification_metrics(y, np.eye(3)[pred], CLASSES, "false_call")
    a = bootstrap_macro_recall(y, pred, 3, seed=7)
    assert a == bootstrap_macro_recall(y, pred, 3, seed=7)
    assert a != bootstrap_macro_recall(y, pred, 3, seed=8)
    assert a.point == pytest.approx(m.macro_recall, abs=1e-12)
    assert a.low < a.point < a.high and a.n == 600 and a.unit == "samples" and a.method == "bootstrap"
    assert a.high - a.low < 0.1


def test_bootstrap_over_groups_is_wider_when_errors_cluster() -> None:
    # 40 boards of 20 crops; all errors sit on 4 boards: resampling boards must show more spread than resampling crops
    boards = np.repeat(np.arange(40), 20)
    y = np.tile(np.arange(20) % 2, 40)
    pred = y.copy()
    bad = np.isin(boards, [0, 1, 2, 3])
    pred[bad] = 1 - y[bad]
    crops = bootstrap_macro_recall(y, pred, 2, seed=0)
    grouped = bootstrap_macro_recall(y, pred, 2, groups=[f"b{b}" for b in boards], seed=0)
    assert crops.point == grouped.point == pytest.approx(0.9)
    assert grouped.n == 40 and grouped.unit == "groups"
    assert grouped.high - grouped.low > 2 * (crops.high - crops.low)


def test_bootstrap_macro_recall_edge_cases() -> None:
    empty = bootstrap_macro_recall(np.zeros(0, int), np.zeros(0, int), 3)
    assert not empty.defined and empty.n == 0
    perfect = bootstrap_macro_recall(np.array([0, 1, 2]), np.array([0, 1, 2]), 3)
    assert (perfect.low, perfect.point, perfect.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one id per sample"):
        bootstrap_macro_recall(np.array([0, 1]), np.array([0, 1]), 2, groups=["a"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        bootstrap_macro_recall(np.array([0, 2]), np.array([0, 1]), 2)


# -- DeepPCB boards -----------------------------------------------------------------------------------------------

NAMES = ("open", "short", "mousebite", "spur", "copper", "pin-hole")


def random_boards(n: int, seed: int) -> dict[str, tuple[list[GroundTruth], list[Detection]]]:
    """Boards with 2-8 defects each; most are found (some with the wrong type), plus false positives; confidences are
    rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in range(n):
        gts, dets = [], []
        for _ in range(int(rng.integers(2, 9))):
            x, y = (float(v) for v in rng.uniform(0, 600, 2))
            name = NAMES[int(rng.integers(0, 6))]
            gts.append(GroundTruth(x, y, x + 20, y + 20, name))
            if rng.random() < 0.92:
                label = name if rng.random() < 0.95 else NAMES[int(rng.integers(0, 6))]
                dx = float(rng.uniform(-3, 3))
                dets.append(Detection(x + dx, y, x + 20 + dx, y + 20, round(float(rng.uniform(0.5, 1)), 2), label))
        for _ in range(int(rng.poisson(0.8))):
            x, y = (float(v) for v in rng.uniform(0, 600, 2))
            dets.append(Detection(x, y, x + 15, y + 15, round(float(rng.uniform(0, 0.8)), 2), "spur"))
        out[f"{seed:02d}{b:06d}"] = (gts, dets)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_reproduce_the_benchmark_score(seed: int) -> None:
    images = random_boards(60, seed)
    images["empty"] = ([], [])
    images["fp-only"] = ([], [Detection(0, 0, 5, 5, 0.99, "open")])
    ref = score(images)
    got = weighted_board_scores(match_boards(images), np.ones((1, len(images)), np.int64))
    assert (got["map"][0], got["fscore"][0], got["precision"][0], got["recall"][0]) == (
        ref.map, ref.fscore, ref.precision, ref.recall)


def test_weights_equal_scoring_the_resampled_set() -> None:
    # a board drawn twice = the same board under two names whose detections rank next to each other
    images = random_boards(12, 4)
    keys = sorted(images)
    w = np.zeros(len(keys), np.int64)
    w[[0, 3, 7]] = [2, 1, 3]
    expanded = {f"{k}-{c}": images[k] for k, n in zip(keys, w, strict=True) for c in range(n)}
    ref = score(expanded)
    got = weighted_board_scores(match_boards(images), w[None, :])
    assert got["fscore"][0] == pytest.approx(ref.fscore, abs=1e-12)
    assert got["map"][0] == pytest.approx(ref.map, abs=1e-9)  # only exact ties across copies may rank differently
    zero = weighted_board_scores(match_boards(images), np.zeros((1, len(keys)), np.int64))
    assert zero["map"][0] == 0.0 and zero["fscore"][0] == 0.0


def test_board_bootstrap_contains_the_point_and_shrinks_with_more_boards() -> None:
    small = bootstrap_board_scores(random_boards(25, 5), seed=1)
    large = bootstrap_board_scores(random_boards(400, 5), seed=1)
    for iv in (small.map, small.fscore, large.map, large.fscore):
        assert iv.low <= iv.point <= iv.high and iv.method == "bootstrap" and iv.unit == "boards"
    assert small.map.point == pytest.approx(score(random_boards(25, 5)).map)
    assert large.map.n == 400
    assert large.map.high - large.map.low < 0.6 * (small.map.high - small.map.low)
    assert large.fscore.high - large.fscore.low < 0.6 * (small.fscore.high - small.fscore.low)
    assert bootstrap_board_scores(random_boards(25, 5), seed=1) == small  # deterministic for a seed
    back = BoardIntervals.from_dict(json.loads(json.dumps(small.to_dict(), allow_nan=False)))
    assert back == small
    none = bootstrap_board_scores({})
    assert not none.map.defined and none.map.n == 0


def test_board_bootstrap_is_fast() -> None:
    images = random_boards(200, 6)
    matches = match_boards(images)
    start = time.perf_counter()
    bootstrap_board_scores(images, n_resamples=1000, matches=matches)
    assert time.perf_counter() - start < 2.0


def test_board_breakdown_per_design_and_worst() -> None:
    images = {**random_boards(30, 7), **{f"x{k}": v for k, v in random_boards(10, 8).items()}}
    for key in [k for k in images if k.startswith("x")][:5]:  # a design where nothing is found
        images[key] = (images[key][0], [])
    groups = {k: ("groupB" if k.startswith("x") else "groupA") for k in images}
    out = board_breakdown(images, groups, seed=3)
    assert list(out["per_group"]) == ["groupA", "groupB"]
    a = score({k: v for k, v in images.items() if groups[k] == "groupA"})
    assert out["per_group"]["groupA"] == {"boards": 30, "map": a.map, "fscore": a.fscore, "precision": a.precision,
                                          "recall": a.recall}
    assert out["worst_group"]["group"] == "groupB"
    assert out["worst_group"]["fscore"] < out["per_group"]["groupA"]["fscore"]
    assert BoardIntervals.from_dict(out["intervals"]) == bootstrap_board_scores(images, seed=3)
    json.dumps(out, allow_nan=False)
    assert board_breakdown({}, {})["worst_group"] is None
