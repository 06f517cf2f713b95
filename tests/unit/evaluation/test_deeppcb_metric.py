"""Tests for evaluation.deeppcb: the DeepPCB benchmark metric on hand-made cases with hand-computed numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from defectops.evaluation.deeppcb import (
    Detection,
    GroundTruth,
    Match,
    boxes_found,
    deeppcb_iou,
    format_result_lines,
    match_image,
    oracle_detections,
    parse_result_file,
    score,
)
from defectops.training.candidates import iou as pixel_iou


def gt(x1: float, y1: float, x2: float, y2: float, label: str = "open") -> GroundTruth:
    return GroundTruth(x1, y1, x2, y2, label)


def det(x1: float, y1: float, x2: float, y2: float, confidence: float, label: str = "open") -> Detection:
    return Detection(x1, y1, x2, y2, confidence, label)


# -- IoU ------------------------------------------------------------------------------------------------------------


def test_iou_is_continuous_without_plus_one() -> None:
    # (0,0)-(10,10) and (5,0)-(15,10): intersection 5 * 10 = 50, union 100 + 100 - 50 = 150
    assert deeppcb_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # boxes touching at a corner share no area here, unlike inclusive pixel boxes (1 common pixel of 7)
    assert deeppcb_iou((0, 0, 1, 1), (1, 1, 2, 2)) == 0.0
    assert pixel_iou((0, 0, 1, 1), (1, 1, 2, 2)) == pytest.approx(1 / 7)
    # identical boxes, dataclasses and numpy rows are accepted alike
    assert deeppcb_iou(gt(3, 4, 30, 40), det(3, 4, 30, 40, 0.5)) == 1.0
    assert deeppcb_iou(np.array([0, 0, 10, 10]), [0, 0, 10, 5]) == pytest.approx(0.5)
    # empty boxes: IoU 0 (the script's zero division is caught and gives 0)
    assert deeppcb_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0
    assert deeppcb_iou((5, 5, 5, 9), (0, 0, 10, 10)) == 0.0
    with pytest.raises(ValueError, match="4 coordinates"):
        deeppcb_iou((0, 0, 1), (0, 0, 1, 1))


def test_iou_threshold_is_strict_just_below_and_above() -> None:
    g = [gt(0, 0, 100, 100)]  # area 10,000; a detection (0,0)-(100,h) inside it has IoU h / 100
    assert match_image(g, [det(0, 0, 100, 33, 0.9)]) == [Match(None, False)]  # IoU 0.33 is not > 0.33
    assert match_image(g, [det(0, 0, 100, 33.5, 0.9)]) == [Match(0, True)]  # IoU 0.335
    assert match_image(g, [det(0, 0, 100, 34, 0.9)], iou_threshold=0.5) == [Match(None, False)]
    s = score({"a": (g, [det(0, 0, 100, 32.9, 0.9)])})
    assert (s.n_matched, s.n_correct, s.precision, s.recall) == (0, 0, 0.0, 0.0)


# -- matching ---------------------------------------------------------------------------------------------------------


def test_perfect_detections() -> None:
    images = {
        "img1": ([gt(10, 10, 40, 40, "open"), gt(100, 100, 130, 125, "short")],
                 [det(100, 100, 130, 125, 0.7, "short"), det(10, 10, 40, 40, 0.9, "open")]),
        "img2": ([gt(5, 5, 30, 30, "pin-hole")], [det(5, 5, 30, 30, 0.2, "pin-hole")]),
    }
    s = score(images)
    # 3 of 3 correct: P = R = F = 1; every correct detection is at precision 1, so AP = (1 + 1 + 1) / 3 = 1
    assert (s.map, s.precision, s.recall, s.fscore) == (1.0, 1.0, 1.0, 1.0)
    assert (s.n_images, s.n_gt, s.n_det, s.n_correct, s.n_matched) == (2, 3, 3, 3, 3)
    assert s.per_class_ap == {"open": 1.0, "pin-hole": 1.0, "short": 1.0}
    assert s.per_class_recall == {"open": 1.0, "pin-hole": 1.0, "short": 1.0}


def test_wrong_class_is_matched_but_not_correct() -> None:
    g = [gt(0, 0, 20, 20, "open")]
    assert match_image(g, [det(0, 0, 20, 20, 0.9, "short")]) == [Match(0, False)]
    s = score({"a": (g, [det(0, 0, 20, 20, 0.9, "short")])})
    # localised (n_matched 1) but not correct: P = 0 / 1, R = 0 / 1, F = 0, AP = 0
    assert (s.n_matched, s.n_correct, s.precision, s.recall, s.fscore, s.map) == (1, 0, 0.0, 0.0, 0.0, 0.0)
    assert s.per_class_recall["open"] == 0.0
    assert math.isnan(s.per_class_recall["short"])  # no "short" ground truth: undefined
    # names are compared case-insensitively, like the script's upper()
    assert match_image(g, [det(0, 0, 20, 20, 0.9, "OPEN")]) == [Match(0, True)]


def test_wrong_class_takes_the_ground_truth_whatever_the_class() -> None:
    g = [gt(0, 0, 20, 20, "open")]
    dets = [det(0, 0, 20, 20, 0.9, "short"), det(0, 0, 20, 20, 0.8, "open")]
    # the more confident detection pairs first although its class is wrong; the right one is left over (a FP)
    assert match_image(g, dets) == [Match(0, False), Match(None, False)]
    s = score({"a": (g, dets)})
    assert (s.n_correct, s.precision, s.recall, s.map) == (0, 0.0, 0.0, 0.0)


def test_duplicate_detection_of_one_gt_is_a_false_positive() -> None:
    g = [gt(0, 0, 20, 20, "spur")]
    dets = [det(0, 0, 20, 20, 0.9, "spur"), det(2, 0, 22, 20, 0.8, "spur")]  # IoU 360 / 440 = 0.82 with the GT
    assert match_image(g, dets) == [Match(0, True), Match(None, False)]
    s = score({"a": (g, dets)})
    # P = 1/2, R = 1/1, F = 2 * 0.5 * 1 / 1.5 = 2/3; ranking (T, F): AP = (1/1) / 1 = 1
    assert s.precision == pytest.approx(0.5)
    assert s.recall == 1.0
    assert s.fscore == pytest.approx(2 / 3)
    assert s.map == 1.0


def test_order_effects() -> None:
    g = [gt(0, 0, 20, 20, "open")]
    low, high = det(0, 0, 20, 20, 0.3, "open"), det(1, 1, 20, 20, 0.9, "open")
    # listed first but less confident: the script sorts by confidence, so the 0.9 detection takes the GT;
    # results come back in the given order
    assert match_image(g, [low, high]) == [Match(None, False), Match(0, True)]
    # and the result file is written in descending confidence (what DATASET.md asks for)
    assert format_result_lines([low, high]).splitlines() == ["1,1,20,20,0.9,open", "0,0,20,20,0.3,open"]
    # first free detection above the threshold, not the best one: 0.9 has IoU 0.4, 0.8 has IoU 1.0
    near = det(0, 0, 20, 8, 0.9, "open")  # 160 / 400 = 0.4
    assert match_image(g, [near, det(0, 0, 20, 20, 0.8, "open")]) == [Match(0, True), Match(None, False)]
    # ground truths in file order: the first GT takes the only detection that overlaps both
    two = [gt(0, 0, 20, 20, "open"), gt(0, 0, 20, 18, "short")]
    assert match_image(two, [det(0, 0, 20, 19, 0.5, "short")]) == [Match(0, False)]
    assert match_image(two[::-1], [det(0, 0, 20, 19, 0.5, "short")]) == [Match(0, True)]
    # equal confidences keep the given (file) order
    a, b = det(0, 0, 20, 20, 0.5, "open"), det(0, 0, 20, 20, 0.5, "short")
    assert match_image(g, [a, b]) == [Match(0, True), Match(None, False)]
    assert match_image(g, [b, a]) == [Match(0, False), Match(None, False)]


def test_empty_images_and_no_detections() -> None:
    empty = score({})
    assert (empty.map, empty.precision, empty.recall, empty.fscore, empty.n_images) == (0.0, 0.0, 0.0, 0.0, 0)
    # an image with neither GT nor detections changes nothing but the image count
    g = [gt(0, 0, 20, 20, "open")]
    base = score({"a": (g, [det(0, 0, 20, 20, 0.9)])})
    more = score({"a": (g, [det(0, 0, 20, 20, 0.9)]), "b": ([], [])})
    assert (more.map, more.precision, more.recall, more.n_images) == (base.map, base.precision, base.recall, 2)
    # detections on an image without GT are false positives: P = 1/2, R = 1, AP = 1 (the FP ranks after the TP)
    fp = score({"a": (g, [det(0, 0, 20, 20, 0.9)]), "b": ([], [det(5, 5, 9, 9, 0.1)])})
    assert (fp.precision, fp.recall, fp.map) == (0.5, 1.0, 1.0)
    # ... and ranked above the TP they halve AP: (1/2) / 1
    assert score({"a": (g, [det(0, 0, 20, 20, 0.9)]), "b": ([], [det(5, 5, 9, 9, 0.95)])}).map == 0.5
    # no detections at all: P = 0 (0 / 0 taken as 0), R = 0, F = 0, AP = 0 per class too
    none = score({"a": (g, []), "b": ([gt(1, 1, 9, 9, "spur")], [])})
    assert (none.map, none.precision, none.recall, none.fscore, none.n_det) == (0.0, 0.0, 0.0, 0.0, 0)
    assert none.per_class_ap == {"open": 0.0, "spur": 0.0}
    assert none.per_class_recall == {"open": 0.0, "spur": 0.0}


def test_ap_on_a_small_ranked_list_by_hand() -> None:
    # image a: GT0 open, GT1 open; image b: GT2 short, GT3 spur (missed). Five detections, global ranking:
    #   0.9 open  @GT0 (a)  TP   precision 1/1
    #   0.8 open  nowhere (b) FP
    #   0.7 short @GT2 (b)  TP   precision 2/3
    #   0.6 short nowhere (a) FP
    #   0.5 open  @GT1 (a)  TP   precision 3/5
    # AP = (1 + 2/3 + 3/5) / 4 GT = 0.566667; P = 3/5, R = 3/4, F = 2 * 0.6 * 0.75 / 1.35 = 2/3
    # per class (same formula within the predicted class):
    #   open:  0.9 T, 0.8 F, 0.5 T over 2 GT -> (1/1 + 2/3) / 2 = 0.833333;  short: 0.7 T, 0.6 F over 1 GT -> 1.0
    #   spur:  no detection over 1 GT -> 0.0
    images = {
        "a": ([gt(0, 0, 10, 10, "open"), gt(100, 0, 110, 10, "open")],
              [det(300, 300, 310, 310, 0.6, "short"), det(100, 0, 110, 10, 0.5, "open"),
               det(0, 0, 10, 10, 0.9, "open")]),
        "b": ([gt(0, 0, 10, 10, "short"), gt(200, 200, 210, 210, "spur")],
              [det(0, 0, 10, 10, 0.7, "short"), det(400, 400, 410, 410, 0.8, "open")]),
    }
    s = score(images)
    assert s.map == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert (s.precision, s.recall) == (pytest.approx(0.6), 0.75)
    assert s.fscore == pytest.approx(2 / 3)
    assert (s.n_gt, s.n_det, s.n_correct, s.n_matched) == (4, 5, 3, 3)
    assert s.per_class_ap == pytest.approx({"open": (1 + 2 / 3) / 2, "short": 1.0, "spur": 0.0})
    assert s.per_class_recall == {"open": 1.0, "short": 1.0, "spur": 0.0}
    # the keys only name the images; the result does not depend on the mapping's order
    assert score(dict(reversed(list(images.items())))) == s


def test_to_dict_is_json_ready() -> None:
    s = score({"a": ([gt(0, 0, 20, 20, "open")], [det(0, 0, 20, 20, 0.9, "short")])})
    d = s.to_dict()
    assert d["per_class_ap"] == {"open": 0.0, "short": None}  # no "short" GT: undefined, written as None
    assert d["per_class_recall"] == {"open": 0.0, "short": None}
    assert json.loads(json.dumps(d)) == d
    assert (d["n_images"], d["n_gt"], d["n_det"], d["n_correct"], d["n_matched"]) == (1, 1, 1, 0, 1)


def test_non_finite_confidence_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        score({"a": ([], [det(0, 0, 1, 1, math.nan)])})


# -- result files -----------------------------------------------------------------------------------------------------


def test_format_and_parse_round_trip() -> None:
    dets = [det(1.4, 2.5, 30.6, 40, 0.25, "mousebite"), det(5, 6, 7, 8, 1.0, "pin-hole"),
            det(0, 0, 9, 9, 1e-7, "copper"), det(10, 10, 20, 20, 0.25, "spur")]
    text = format_result_lines(dets)
    assert text == ("5,6,7,8,1,pin-hole\n"
                    "1,3,31,40,0.25,mousebite\n"  # coordinates rounded half up; equal confidences keep their order
                    "10,10,20,20,0.25,spur\n"
                    "0,0,9,9,0.0000001,copper\n")  # never an exponent (the script's regex would reject it)
    back = parse_result_file(text)
    assert back == [det(5, 6, 7, 8, 1.0, "pin-hole"), det(1, 3, 31, 40, 0.25, "mousebite"),
                    det(10, 10, 20, 20, 0.25, "spur"), det(0, 0, 9, 9, 1e-7, "copper")]
    assert format_result_lines(back) == text
    assert format_result_lines([]) == ""
    # CRLF, blank lines and spaces around fields are tolerated
    assert parse_result_file("\r\n 1, 2,3,4 ,0.5, open \r\n\r\n") == [det(1, 2, 3, 4, 0.5, "open")]


def test_format_and_parse_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        format_result_lines([det(0, 0, 1, 1, 1.5)])
    with pytest.raises(ValueError, match="name"):
        format_result_lines([det(0, 0, 1, 1, 0.5, "pin hole")])
    with pytest.raises(ValueError, match="invalid box"):
        format_result_lines([det(5, 0, 1, 1, 0.5)])
    with pytest.raises(ValueError, match="line 2"):
        parse_result_file("1,2,3,4,0.5,open\n1,2,3,4,open\n")
    with pytest.raises(ValueError, match="line 1: non-numeric"):
        parse_result_file("1,2,x,4,0.5,open\n")
    with pytest.raises(ValueError, match="line 1: empty name"):
        parse_result_file("1,2,3,4,0.5,\n")


# -- candidate ceilings -----------------------------------------------------------------------------------------------


def test_candidate_ceiling_helpers() -> None:
    gts = [gt(0, 0, 20, 20, "open"), gt(100, 100, 120, 120, "short")]
    boxes = [(0, 0, 20, 20), (2, 0, 22, 20), (100, 100, 120, 105), (300, 300, 310, 310)]
    # the second GT's only box has IoU 100 / 400 = 0.25
    assert boxes_found(gts, boxes) == [True, False]
    oracle = oracle_detections(gts, boxes)
    assert [(d.box, d.label) for d in oracle] == [((0, 0, 20, 20), "open"), ((2, 0, 22, 20), "open")]
    assert [d.confidence for d in oracle] == pytest.approx([1.0, 360 / 440])
    # a perfect classifier on these candidates: 1 correct of 2 detections (the duplicate is a FP), 1 of 2 GT
    s = score({"a": (gts, oracle)})
    assert (s.precision, s.recall, s.map) == (0.5, 0.5, 0.5)
