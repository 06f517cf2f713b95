"""Tests for evaluation.metrics: hand-computed cases, edge cases and input validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from defectops.evaluation.metrics import ClassificationMetrics, classification_metrics, confusion_matrix, pr_curves

CLASSES = ("ok", "open", "short")


def scores_for(pred: list[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """Softmax-like scores whose argmax is ``pred``: 0.8 on the predicted class, the rest shared equally."""
    pred = np.asarray(pred)
    probs = np.full((pred.size, n_classes), 0.2 / (n_classes - 1))
    probs[np.arange(pred.size), pred] = 0.8
    return probs


# ---------------------------------------------------------------------------------------------------------------
# hand-computed 3-class case
#
#   y_true = ok ok ok ok | open open open | short short short
#   y_pred = ok ok ok op | open open ok   | short open  short
#
#   confusion (rows = true, cols = pred):       support   predicted
#            ok  open short                              (column sums)
#   ok        3    1    0                          4        4
#   open      1    2    0                          3        4
#   short     0    1    2                          3        2
#
#   recall    ok 3/4 = 0.75, open 2/3, short 2/3                -> macro (0.75 + 2/3 + 2/3) / 3 = 25/36
#   precision ok 3/4 = 0.75, open 2/4 = 0.5, short 2/2 = 1.0    -> macro 2.25 / 3 = 0.75
#   f1        ok 0.75, open 2*0.5*(2/3)/(0.5+2/3) = 4/7, short 2*1*(2/3)/(1+2/3) = 0.8
#   accuracy  (3 + 2 + 2) / 10 = 0.7
#   escape    defects = 6 (open + short); predicted ok: 1 (an open)  -> 1/6
#   false call good = 4; predicted as a defect: 1 (as open)          -> 1/4
HAND_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
HAND_PRED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 1, 2])


@pytest.fixture
def hand() -> ClassificationMetrics:
    return classification_metrics(HAND_TRUE, scores_for(HAND_PRED, 3), CLASSES, "ok")


def test_hand_case_confusion_and_support(hand: ClassificationMetrics) -> None:
    assert hand.confusion == ((3, 1, 0), (1, 2, 0), (0, 1, 2))
    assert hand.support == {"ok": 4, "open": 3, "short": 3}
    assert hand.n == 10
    assert hand.classes == CLASSES
    assert hand.good_class == "ok"


def test_hand_case_rates(hand: ClassificationMetrics) -> None:
    assert hand.accuracy == pytest.approx(0.7)
    assert hand.per_class_recall == pytest.approx({"ok": 0.75, "open": 2 / 3, "short": 2 / 3})
    assert hand.per_class_precision == pytest.approx({"ok": 0.75, "open": 0.5, "short": 1.0})
    assert hand.per_class_f1 == pytest.approx({"ok": 0.75, "open": 4 / 7, "short": 0.8})
    assert hand.macro_recall == pytest.approx(25 / 36)
    assert hand.macro_precision == pytest.approx(0.75)
    assert hand.escape_rate == pytest.approx(1 / 6)
    assert hand.false_call_rate == pytest.approx(0.25)


def test_defect_confused_with_other_defect_is_neither_escape_nor_false_call() -> None:
    # open -> short twice: 0 escapes, 0 false calls, but open recall drops to 0
    m = classification_metrics(np.array([0, 1, 1, 2]), scores_for([0, 2, 2, 2], 3), CLASSES, "ok")
    assert m.escape_rate == 0.0
    assert m.false_call_rate == 0.0
    assert m.per_class_recall["open"] == 0.0


def test_perfect_classifier() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    m = classification_metrics(y, scores_for(y, 3), CLASSES, "ok")
    assert m.accuracy == 1.0
    assert m.macro_recall == 1.0
    assert m.macro_precision == 1.0
    assert set(m.per_class_recall.values()) == {1.0}
    assert set(m.per_class_precision.values()) == {1.0}
    assert set(m.per_class_f1.values()) == {1.0}
    assert m.escape_rate == 0.0
    assert m.false_call_rate == 0.0
    assert m.confusion == ((3, 0, 0), (0, 2, 0), (0, 0, 2))
    for curve in pr_curves(y, scores_for(y, 3), CLASSES).values():
        assert curve.average_precision == pytest.approx(1.0)


def test_everything_predicted_good() -> None:
    # 2 ok, 3 open, 1 short, all predicted ok:
    #   escape = 4/4 = 1.0, false call = 0/2 = 0.0
    #   recall ok 1, open 0, short 0 -> macro 1/3
    #   precision ok 2/6; open and short never predicted but present -> 0.0 (documented) -> macro (1/3 + 0 + 0) / 3
    y = np.array([0, 0, 1, 1, 1, 2])
    m = classification_metrics(y, scores_for(np.zeros(6, dtype=int), 3), CLASSES, "ok")
    assert m.escape_rate == 1.0
    assert m.false_call_rate == 0.0
    assert m.per_class_recall == {"ok": 1.0, "open": 0.0, "short": 0.0}
    assert m.per_class_precision == pytest.approx({"ok": 1 / 3, "open": 0.0, "short": 0.0})
    assert m.per_class_f1 == pytest.approx({"ok": 0.5, "open": 0.0, "short": 0.0})
    assert m.macro_recall == pytest.approx(1 / 3)
    assert m.macro_precision == pytest.approx(1 / 9)
    assert m.accuracy == pytest.approx(2 / 6)


def test_argmax_ties_go_to_lowest_index() -> None:
    probs = np.array([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45]])
    m = classification_metrics(np.array([0, 1]), probs, CLASSES, "ok")
    assert m.confusion == ((1, 0, 0), (0, 1, 0), (0, 0, 0))


def test_good_class_need_not_be_first() -> None:
    # good = "short" (index 2); true open predicted short is an escape (1 of 2 defects)
    m = classification_metrics(np.array([0, 1, 2]), scores_for([0, 2, 2], 3), CLASSES, "short")
    assert m.escape_rate == pytest.approx(0.5)
    assert m.false_call_rate == 0.0


# ---------------------------------------------------------------------------------------------------------------
# edge cases


def test_class_without_support_and_predictions_is_undefined_and_excluded() -> None:
    # no "short" anywhere: recall/precision/f1 NaN, macro over ok/open only
    #   ok: 2 true, predicted [ok, open] -> recall 1/2; predicted ok once (correct) -> precision 1
    #   open: 1 true, predicted open -> recall 1; open predicted twice (one wrong) -> precision 1/2
    y = np.array([0, 0, 1])
    m = classification_metrics(y, scores_for([0, 1, 1], 3), CLASSES, "ok")
    assert math.isnan(m.per_class_recall["short"])
    assert math.isnan(m.per_class_precision["short"])
    assert math.isnan(m.per_class_f1["short"])
    assert m.support["short"] == 0
    assert m.macro_recall == pytest.approx((0.5 + 1.0) / 2)
    assert m.macro_precision == pytest.approx((1.0 + 0.5) / 2)
    d = m.to_dict()
    assert d["per_class_recall"]["short"] is None
    assert d["per_class_precision"]["short"] is None
    assert d["per_class_f1"]["short"] is None


def test_class_predicted_but_absent_has_precision_zero_and_counts_in_macro_precision() -> None:
    # no true "short", but one ok predicted as short: precision(short) = 0/1 = 0, recall(short) undefined
    #   precision ok 1/1, open 1/1, short 0/1 -> macro precision 2/3; recall ok 1/2, open 1 -> macro 0.75
    y = np.array([0, 0, 1])
    m = classification_metrics(y, scores_for([0, 2, 1], 3), CLASSES, "ok")
    assert m.per_class_precision["short"] == 0.0
    assert math.isnan(m.per_class_recall["short"])
    assert math.isnan(m.per_class_f1["short"])
    assert m.macro_precision == pytest.approx(2 / 3)
    assert m.macro_recall == pytest.approx(0.75)


def test_no_good_samples_gives_zero_false_call_rate() -> None:
    y = np.array([1, 2, 2])
    m = classification_metrics(y, scores_for([0, 2, 2], 3), CLASSES, "ok")
    assert m.false_call_rate == 0.0
    assert m.escape_rate == pytest.approx(1 / 3)
    assert math.isnan(m.per_class_recall["ok"])
    assert m.per_class_precision["ok"] == 0.0  # predicted once, absent from the data


def test_no_defect_samples_gives_zero_escape_rate() -> None:
    y = np.array([0, 0, 0, 0])
    m = classification_metrics(y, scores_for([0, 0, 0, 1], 3), CLASSES, "ok")
    assert m.escape_rate == 0.0
    assert m.false_call_rate == pytest.approx(0.25)


def test_empty_input_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 3)), CLASSES, "ok")
    with pytest.raises(ValueError, match="empty"):
        pr_curves(np.array([], dtype=int), np.zeros((0, 3)), CLASSES)


@pytest.mark.parametrize(
    "probs",
    [np.zeros((3, 4)), np.zeros((4, 3)), np.zeros(3), np.zeros((3, 3, 1))],
    ids=["too-many-classes", "too-many-rows", "1d", "3d"],
)
def test_probs_shape_mismatch_raises_clear_message(probs: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"probs must have shape \(N, C\) = \(3, 3\)"):
        classification_metrics(np.array([0, 1, 2]), probs, CLASSES, "ok")


@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_out_of_range_raise(bad: int) -> None:
    with pytest.raises(ValueError, match="outside the valid range"):
        classification_metrics(np.array([0, bad, 1]), np.zeros((3, 3)), CLASSES, "ok")
    with pytest.raises(ValueError, match="outside the valid range"):
        pr_curves(np.array([0, bad, 1]), np.zeros((3, 3)), CLASSES)


def test_non_integer_labels_raise() -> None:
    with pytest.raises(ValueError, match="integer"):
        classification_metrics(np.array([0.0, 1.0, 2.0]), np.zeros((3, 3)), CLASSES, "ok")


def test_non_finite_scores_raise() -> None:
    probs = scores_for([0, 1, 2], 3)
    probs[1, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        classification_metrics(np.array([0, 1, 2]), probs, CLASSES, "ok")


def test_unknown_good_class_and_duplicate_classes_raise() -> None:
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="good_class 'pass'"):
        classification_metrics(y, scores_for(y, 3), CLASSES, "pass")
    with pytest.raises(ValueError, match="unique"):
        classification_metrics(y, scores_for(y, 3), ("ok", "open", "ok"), "ok")


def test_to_dict_is_json_ready_and_roundtrips() -> None:
    y = np.array([0, 0, 1])  # "short" has no support -> None in the dict
    m = classification_metrics(y, scores_for([0, 1, 1], 3), CLASSES, "ok")
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)  # no NaN leaks into JSON
    back = ClassificationMetrics.from_dict(json.loads(text))
    assert back.to_dict() == d
    assert back.classes == m.classes
    assert back.confusion == m.confusion
    assert math.isnan(back.per_class_recall["short"])
    assert isinstance(d["confusion"], list)
    assert all(isinstance(v, int) for row in d["confusion"] for v in row)


# ---------------------------------------------------------------------------------------------------------------
# confusion_matrix


def test_confusion_matrix_counts() -> None:
    cm = confusion_matrix(HAND_TRUE, HAND_PRED, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 2, 0], [0, 1, 2]])


def test_confusion_matrix_empty_is_zero_and_validates() -> None:
    np.testing.assert_array_equal(
        confusion_matrix(np.array([], dtype=int), np.array([], dtype=int), 2), np.zeros((2, 2))
    )
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError, match="outside the valid range"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)


# ---------------------------------------------------------------------------------------------------------------
# PR curves


def test_pr_curve_hand_computed() -> None:
    # class "pos": scores 0.9(+) 0.8(-) 0.7(+) 0.1(-), 2 positives
    #   threshold 0.9: tp 1 fp 0 -> P 1,   R 1/2
    #   threshold 0.8: tp 1 fp 1 -> P 1/2, R 1/2
    #   threshold 0.7: tp 2 fp 1 -> P 2/3, R 1
    #   threshold 0.1: tp 2 fp 2 -> P 1/2, R 1
    #   AP = (1/2 - 0) * 1 + 0 * 1/2 + (1 - 1/2) * 2/3 + 0 * 1/2 = 5/6
    # sklearn layout: increasing thresholds, then the (P=1, R=0) end point
    s = np.array([0.9, 0.8, 0.7, 0.1])
    y = np.array([1, 0, 1, 0])
    curves = pr_curves(y, np.stack([1 - s, s], axis=1), ["neg", "pos"])
    pos = curves["pos"]
    assert pos.label == "pos"
    assert pos.thresholds == pytest.approx((0.1, 0.7, 0.8, 0.9))
    assert pos.precision == pytest.approx((0.5, 2 / 3, 0.5, 1.0, 1.0))
    assert pos.recall == pytest.approx((1.0, 1.0, 0.5, 0.5, 0.0))
    assert pos.average_precision == pytest.approx(5 / 6)
    # "neg" scores 0.9(+, idx 3) 0.3(-) 0.2(+) 0.1(-): the same pattern, AP 5/6
    assert curves["neg"].average_precision == pytest.approx(5 / 6)
    assert list(curves) == ["neg", "pos"]


def test_pr_curve_tied_scores_form_one_operating_point() -> None:
    # all scores 0.5, 2 of 3 positive: one threshold, P = 2/3 at R = 1 -> AP = 2/3
    y = np.array([1, 0, 1])
    probs = np.full((3, 2), 0.5)
    pos = pr_curves(y, probs, ["neg", "pos"])["pos"]
    assert pos.thresholds == (0.5,)
    assert pos.precision == pytest.approx((2 / 3, 1.0))
    assert pos.recall == pytest.approx((1.0, 0.0))
    assert pos.average_precision == pytest.approx(2 / 3)


def test_pr_curve_class_without_positives_is_undefined() -> None:
    y = np.array([0, 1, 0])
    curves = pr_curves(y, scores_for([0, 1, 2], 3), CLASSES)
    short = curves["short"]
    assert short.precision == short.recall == short.thresholds == ()
    assert math.isnan(short.average_precision)
    assert short.to_dict()["average_precision"] is None


def test_matches_sklearn_on_random_data() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_classes = int(rng.integers(2, 6))
        n = int(rng.integers(5, 80))
        y = rng.integers(0, n_classes, n)
        probs = rng.random((n, n_classes)).round(1)  # rounding creates ties
        names = [f"c{k}" for k in range(n_classes)]
        curves = pr_curves(y, probs, names)
        m = classification_metrics(y, probs, names, "c0")
        pred = probs.argmax(axis=1)
        for k, name in enumerate(names):
            if not (y == k).any():
                continue
            precision, recall, thresholds = sk.precision_recall_curve(y == k, probs[:, k])
            np.testing.assert_allclose(curves[name].precision, precision)
            np.testing.assert_allclose(curves[name].recall, recall)
            np.testing.assert_allclose(curves[name].thresholds, thresholds)
            assert curves[name].average_precision == pytest.approx(sk.average_precision_score(y == k, probs[:, k]))
        np.testing.assert_array_equal(m.confusion, sk.confusion_matrix(y, pred, labels=range(n_classes)))
        assert m.accuracy == pytest.approx(sk.accuracy_score(y, pred))
