"""Boxes from anomaly maps scored by the DeepPCB rule, type-agnostic (evaluation.anomaly_boxes)."""

from __future__ import annotations

import numpy as np
import pytest

from defectops.evaluation.anomaly_boxes import (
    AGNOSTIC,
    anomaly_boxes,
    choose_map_threshold,
    map_detections,
    score_map_boxes,
)


def test_boxes_from_an_anomaly_map() -> None:
    amap = np.zeros((20, 30))
    amap[2:5, 3:9] = 2.0  # a 3 x 6 region
    amap[10:18, 20:22] = 5.0
    amap[15, 5] = 9.0  # one pixel: under min_area
    boxes = anomaly_boxes(amap, 1.0, min_area=4, scale=(2.0, 2.0))
    assert boxes == [(40.0, 20.0, 44.0, 36.0, 5.0), (6.0, 4.0, 18.0, 10.0, 2.0)]
    assert anomaly_boxes(amap, 10.0) == []


def test_detections_are_type_agnostic_with_confidence_relative_to_the_threshold() -> None:
    amap = np.zeros((10, 10))
    amap[1:4, 1:4] = 3.0
    (d,) = map_detections(amap, 1.0)
    assert d.label == AGNOSTIC and d.confidence == pytest.approx(0.75) and d.box == (1, 1, 4, 4)


def _scene(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[list[tuple[float, ...]]]]:
    """Maps with low noise and one bright square per defect; ground truths are the squares."""
    maps, gts = [], []
    for _ in range(n):
        m = rng.uniform(0, 1, (40, 40))
        g = []
        for x0 in (2, 22):  # one defect in each half: never touching
            x, y = x0 + int(rng.integers(0, 10)), int(rng.integers(2, 30))
            m[y:y + 6, x:x + 6] = rng.uniform(3, 5)
            g.append((float(x), float(y), float(x + 6), float(y + 6)))
        maps.append(m)
        gts.append(g)
    return maps, gts


def test_every_defect_found_and_every_box_correct_on_clean_maps() -> None:
    maps, gts = _scene(np.random.default_rng(0), 6)
    good = [np.random.default_rng(1).uniform(0, 1, (40, 40))]
    s = score_map_boxes(maps, gts, 2.0, good_maps=good)
    assert s.found == s.n_gt == 12 and s.n_boxes == 12
    assert s.precision.point == 1.0 and s.boxes_on_good == 0 and s.good_images == 1
    assert s.deeppcb["recall"] == pytest.approx(s.found / s.n_gt) and s.deeppcb["precision"] == 1.0
    assert 0.0 < s.recall.low <= s.recall.point == 1.0


def test_a_threshold_below_the_noise_merges_everything_and_loses_precision() -> None:
    maps, gts = _scene(np.random.default_rng(0), 6)
    s = score_map_boxes(maps, gts, 0.0)
    assert s.n_boxes == 6 and s.found == 0  # one box per image: the whole map


def test_the_map_threshold_chosen_on_val_separates_defects_from_noise() -> None:
    maps, gts = _scene(np.random.default_rng(2), 8)
    t = choose_map_threshold(maps, gts)
    assert 0.9 <= t.value <= 3.0  # above the noise (single pixels over 0.9 are under min_area), below the defects
    assert t.fscore == pytest.approx(1.0) and t.candidates > 1
    with pytest.raises(ValueError, match="no annotated defect"):
        choose_map_threshold(maps, [[] for _ in maps])
    with pytest.raises(ValueError, match="one per image"):
        score_map_boxes(maps, gts[:-1], 1.0)
