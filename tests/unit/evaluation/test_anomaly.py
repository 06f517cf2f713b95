"""Anomaly-model judgement (evaluation.anomaly): AUROC, threshold choice for a target, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from defectops.evaluation.anomaly import (
    NORMALIZATION_VERSION,
    ScoreNormalization,
    anomaly_probabilities,
    auroc,
    auroc_interval,
    choose_threshold,
    pixel_auroc,
    roc_points,
)
from defectops.evaluation.metrics import classification_metrics


def _scores(n_good: int, n_bad: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.zeros(n_good, bool), np.ones(n_bad, bool)])
    s = np.concatenate([rng.normal(0, 1, n_good), rng.normal(shift, 1, n_bad)])
    return y, s


def test_auroc_matches_sklearn_with_ties() -> None:
    y, s = _scores(80, 30, 1.0)
    s = np.round(s, 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.zeros(5, bool), np.arange(5.0)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        auroc(y, np.where(y, np.nan, s))


def test_pixel_auroc_and_roc_points() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 8, 8), bool)
    masks[1, 2:4, 2:4] = True
    maps = rng.random((3, 8, 8)) + 2.0 * masks
    assert pixel_auroc(masks, maps) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_auroc(masks, maps[:2])
    fpr, tpr, thr = roc_points(np.array([0, 0, 1, 1], bool), np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and np.all(np.diff(thr[1:]) < 0)


def test_interval_covers_the_point_and_narrows_with_data() -> None:
    y, s = _scores(40, 10, 1.5)
    small = auroc_interval(y, s, n_resamples=300)
    y2, s2 = _scores(400, 100, 1.5)
    large = auroc_interval(y2, s2, n_resamples=300)
    assert small.low <= small.point <= small.high and large.low <= large.point <= large.high
    assert large.high - large.low < small.high - small.low


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.3])
def test_threshold_meets_its_escape_target_when_the_targets_conflict(target: float) -> None:
    """Overlapping scores: the escape target wins, at the highest threshold that meets it (fewest false calls)."""
    y, s = _scores(200, 60, 1.0, seed=3)
    t = choose_threshold(y, s, max_escape_rate=target, max_false_call_rate=0.01)
    bad, good = s[y], s[~y]
    assert t.rule == "escape_rate" and t.val_escape_rate is not None and "conflict" in t.note
    assert (bad < t.value).mean() <= target and t.val_escape_rate <= target
    assert (bad < np.nextafter(t.value, np.inf)).mean() > target  # any higher threshold lets one more defect escape
    assert t.val_false_call_rate == pytest.approx((good >= t.value).mean()) and t.val_false_call_rate > 0.01


def test_threshold_sits_in_the_middle_when_both_targets_hold() -> None:
    """Separated scores (a constructed case): every threshold between the top good score and the lowest defect meets
    both targets; the chosen one leaves the same margin to each."""
    good = np.linspace(0.0, 1.0, 50)
    bad = np.linspace(3.0, 5.0, 10)
    y = np.concatenate([np.zeros(50, bool), np.ones(10, bool)])
    t = choose_threshold(y, np.concatenate([good, bad]), max_escape_rate=0.0, max_false_call_rate=0.0)
    assert t.note == "" and t.val_escape_rate == 0.0 and t.val_false_call_rate == 0.0
    assert t.value == pytest.approx(2.0)
    budget = choose_threshold(y, np.concatenate([good, bad]), max_escape_rate=0.0, max_false_call_rate=0.1)
    assert (good >= budget.value).mean() <= 0.1 and budget.value < t.value  # the budget lowers the low end


def test_threshold_from_the_false_call_budget_when_validation_has_no_defects() -> None:
    good = np.random.default_rng(1).normal(size=100)
    t = choose_threshold(np.zeros(100, bool), good, max_escape_rate=0.05, max_false_call_rate=0.1)
    assert t.rule == "false_call_rate" and t.val_escape_rate is None and "no defective" in t.note
    assert (good >= t.value).mean() <= 0.1
    assert (good >= np.nextafter(t.value, -np.inf)).mean() > 0.1 or t.val_false_call_rate == 0.1
    with pytest.raises(ValueError, match="no good samples"):
        choose_threshold(np.ones(3, bool), np.arange(3.0), max_escape_rate=0.1, max_false_call_rate=0.1)
    with pytest.raises(ValueError, match="max_escape_rate"):
        choose_threshold(np.zeros(3, bool), np.arange(3.0), max_escape_rate=1.0, max_false_call_rate=0.1)


def test_probabilities_decide_exactly_at_the_threshold_and_feed_classification_metrics() -> None:
    y, s = _scores(50, 20, 2.0)
    t = choose_threshold(y, s, max_escape_rate=0.1, max_false_call_rate=0.2)
    norm = ScoreNormalization.fit(t.value, s[~y])
    probs = anomaly_probabilities(s, norm)
    assert np.allclose(probs.sum(1), 1.0)
    assert np.array_equal(probs.argmax(1) == 1, s >= t.value)
    assert anomaly_probabilities(np.array([t.value]), norm).argmax(1).tolist() == [1]
    m = classification_metrics(y.astype(int), probs, ("good", "defect"), "good")
    assert m.escape_rate == pytest.approx((s[y] < t.value).mean())
    assert m.false_call_rate == pytest.approx((s[~y] >= t.value).mean())


def test_normalisation_is_versioned() -> None:
    norm = ScoreNormalization.fit(3.0, np.array([1.0, 2.0, 3.0, 4.0]))
    assert norm.scale == pytest.approx(0.5) and norm.normalise(np.array([3.0]))[0] == 0.0  # median 2.5 -> -1
    assert norm.normalise(np.array([2.5]))[0] == pytest.approx(-1.0)
    assert ScoreNormalization.fit(1.0, np.array([1.0, 2.0, 3.0, 4.0])).scale == pytest.approx(1.5)  # IQR
    doc = norm.to_dict()
    assert doc["version"] == NORMALIZATION_VERSION and ScoreNormalization.from_dict(doc) == norm
    with pytest.raises(ValueError, match="another DefectOps version"):
        ScoreNormalization.from_dict({**doc, "version": "anomaly-score-v0"})
    assert ScoreNormalization.fit(1.0, np.ones(4)).scale == 1.0


def test_heatmap_tiles_show_escapes_then_false_calls_then_the_highest_good() -> None:
    from defectops.evaluation.anomaly_report import heatmap_tiles

    images = np.zeros((6, 8, 8, 3), np.uint8)
    maps = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)
    is_defect = np.array([True, True, False, False, False, True])
    scores = np.array([0.2, 0.9, 0.8, 0.1, 0.4, 0.3])  # threshold 0.5: defects 0 and 5 escape, good 2 is a false call
    tiles = heatmap_tiles(images, maps, is_defect, scores, 0.5, ("good", "defect"), limit=4)
    assert [t.confidence for t in tiles] == [0.2, 0.3, 0.8, 0.4]
    assert [t.caption.split(":")[0] for t in tiles] == ["escaped defect", "escaped defect", "false call",
                                                        "good part, high score"]
    assert tiles[0].true_label == "defect" and tiles[0].predicted == "good" and tiles[2].predicted == "defect"


def test_anomaly_section_names_the_rule_and_embeds_the_plots() -> None:
    from defectops.evaluation.anomaly_report import anomaly_section

    y, s = _scores(40, 10, 2.0)
    t = choose_threshold(y, s, max_escape_rate=0.1, max_false_call_rate=0.2)
    doc = {"threshold": t.to_dict(), "normalization": ScoreNormalization.fit(t.value, s[~y]).to_dict(),
           "val": {"image_auroc": auroc_interval(y, s, n_resamples=50).to_dict(), "n_good": 40, "n_defect": 10},
           "test": {"image_auroc": auroc_interval(y, s, n_resamples=50).to_dict(), "pixel_auroc": None,
                    "n_good": 40, "n_defect": 10}}
    html = anomaly_section((y, s), (y, s), doc)
    assert "chosen on val for escape_rate &lt;= 0.1" in html and html.count("data:image/png;base64,") == 3
    assert "<td>n/a</td>" in html  # no masks: no pixel AUROC
