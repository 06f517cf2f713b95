"""The shortcut check: metadata that predicts the class is flagged (pure function, validate_data hook, report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectops.evaluation.gates import GateConfig, evaluate_gates
from defectops.evaluation.metrics import classification_metrics, pr_curves
from defectops.evaluation.report import render_report
from defectops.evaluation.shortcut import DEFAULT_FIX, ShortcutReport, feature_groups, shortcut_check
from defectops.pipelines.results import ValidateDataResult
from defectops.training.crops import box_metadata
from defectops.training.images import image_metadata

NAMES = ["width", "height", "aspect", "bytes", "format=JPEG", "format=PNG"]
CLASSES = ["good", "short", "open"]


def _rows(w: np.ndarray, h: np.ndarray, nbytes: np.ndarray, png: np.ndarray) -> np.ndarray:
    return np.c_[w, h, w / h, nbytes, 1 - png, png].astype(np.float64)


def _sized_by_class(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 is 32x32, class 1 48x64, class 2 64x48; bytes and format are noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    w = np.array([32, 48, 64])[y]
    h = np.array([32, 64, 48])[y]
    return _rows(w, h, rng.integers(800, 1200, y.size), rng.integers(0, 2, y.size)), y


def test_fires_when_the_class_is_the_image_size() -> None:
    x, y = _sized_by_class(20)
    r = shortcut_check(x, NAMES, y, CLASSES)
    assert r.warn and r.checked
    assert r.balanced_accuracy == pytest.approx(1.0) and r.score == pytest.approx(1.0)
    assert r.chance == pytest.approx(1 / 3)
    assert r.top_feature in {"width", "height", "aspect"} and r.top_feature_score == pytest.approx(1.0)
    assert r.per_feature["bytes"] < 0.5 and r.per_feature["format"] < 0.5
    assert r.per_class_recall == {"good": 1.0, "short": 1.0, "open": 1.0}
    assert "width" in r.message and "height" in r.message and "bytes" not in r.message.split(":")[0]
    assert DEFAULT_FIX in r.message and "data.fit_mode=resize|center_crop" in r.message


def test_fires_on_file_format_and_groups_the_one_hot_columns() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    w, h = rng.choice([32, 48, 64], 60), rng.choice([32, 48, 64], 60)
    x = _rows(w, h, rng.integers(800, 1200, 60), (y == 1).astype(int))
    r = shortcut_check(x, NAMES, y, CLASSES[:2])
    assert r.warn and r.top_feature == "format"
    assert r.message.startswith("format predicts the class")
    assert set(r.per_feature) == {"width", "height", "aspect", "bytes", "format"}
    assert feature_groups(NAMES)["format"] == [4, 5]


@pytest.mark.parametrize("seed", range(5))
def test_quiet_when_sizes_and_formats_are_independent_of_the_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 40)
    w, h = rng.choice([32, 48, 64, 96], y.size), rng.choice([32, 48, 64, 96], y.size)
    x = _rows(w, h, rng.integers(800, 1200, y.size), rng.integers(0, 2, y.size))
    r = shortcut_check(x, NAMES, y, CLASSES, seed=seed)
    assert r.checked and not r.warn
    assert r.score is not None and r.score < 0.3
    assert r.message.startswith("metadata does not predict the class") and DEFAULT_FIX not in r.message


def test_small_or_uniform_data_gives_a_note_never_a_warning() -> None:
    x, y = _sized_by_class(3)  # perfectly separable, but 3 < 5 folds per class
    r = shortcut_check(x, NAMES, y, CLASSES)
    assert not r.warn and not r.checked and r.score is None
    assert "fewer than two classes with 5 or more samples" in r.note and "good, short, open" in r.note

    one = shortcut_check(x, NAMES, np.zeros(len(y), np.int64), CLASSES)
    assert not one.warn and one.note == "not checked: only one class"

    flat = shortcut_check(np.ones((60, len(NAMES))), NAMES, np.repeat([0, 1, 2], 20), CLASSES)
    assert not flat.warn and "every metadata feature is the same" in flat.note

    empty = shortcut_check(np.zeros((0, len(NAMES))), NAMES, np.zeros(0, np.int64), CLASSES)
    assert not empty.warn and empty.note == "not checked: no samples" and empty.n_samples == 0


def test_a_rare_class_is_left_out_and_the_rest_still_checked() -> None:
    x, y = _sized_by_class(20)
    keep = np.r_[np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:2]]
    r = shortcut_check(x[keep], NAMES, y[keep], CLASSES)
    assert r.warn and r.chance == pytest.approx(0.5)
    assert set(r.per_class_recall) == {"good", "short"} and r.class_counts == {"good": 20, "short": 20, "open": 2}
    assert "left out open" in r.note


def test_bad_input_is_refused() -> None:
    x, y = _sized_by_class(10)
    with pytest.raises(ValueError, match="do not match"):
        shortcut_check(x, NAMES[:3], y, CLASSES)
    with pytest.raises(ValueError, match="indices into the 2 classes"):
        shortcut_check(x, NAMES, y, CLASSES[:2])
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        shortcut_check(x, NAMES, y, CLASSES)


def test_round_trips_through_json() -> None:
    x, y = _sized_by_class(10)
    r = shortcut_check(x, NAMES, y, CLASSES)
    back = ShortcutReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r
    partial = ShortcutReport.from_dict({"warn": False, "note": "not checked: boom", "extra": 1})
    assert partial.note == "not checked: boom" and not partial.checked


def test_image_metadata_reads_headers(tmp_path: Path) -> None:
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("L", (16, 32), 128).save(tmp_path / "b.jpg", quality=90)
    feats, names = image_metadata([tmp_path / "a.png", tmp_path / "b.jpg"])
    assert names == ["width", "height", "aspect", "bytes", "format=JPEG", "format=PNG", "mode=L", "mode=RGB"]
    assert feats[0].tolist() == [40, 20, 2.0, (tmp_path / "a.png").stat().st_size, 0, 1, 0, 1]
    assert feats[1].tolist() == [16, 32, 0.5, (tmp_path / "b.jpg").stat().st_size, 1, 0, 1, 0]


def test_box_metadata() -> None:
    feats, names = box_metadata([[10, 10, 19, 14], [0, 0, 0, 0]])
    assert names == ["width", "height", "aspect", "area"]
    assert feats.tolist() == [[10, 5, 2.0, 50], [1, 1, 1.0, 1]]


# ------------------------------------------------------------------------------------------ validate_data hook
def _folder_dataset(root: Path, sizes: dict[str, tuple[int, int]], n: int = 14) -> Path:
    rng = np.random.default_rng(0)
    for label, (w, h) in sizes.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / label / f"{i:02d}.png")
    return root


def _validate(tmp_path: Path, data_root: Path, **shortcut: bool) -> tuple[Path, ValidateDataResult]:
    from defectops.core.taxonomy import TaskKind
    from defectops.pipelines.context import StepContext
    from defectops.pipelines.steps.pull_data import pull_data
    from defectops.pipelines.steps.validate_data import validate_data
    from defectops.training.config import AnomalyConfig, CandidateConfig, DataConfig, ShortcutConfig

    data = DataConfig(source="folder", root=str(data_root), good_class="good",
                      candidates=CandidateConfig(crop_size=16), shortcut=ShortcutConfig(**shortcut))
    run = tmp_path / "run"
    ctx = StepContext(run_id="r", root=run, home=tmp_path / "home", config_hash="h")
    pull_data(ctx, data)
    return run, validate_data(ctx, data, TaskKind.classify, AnomalyConfig())


def test_validate_data_warns_when_the_class_is_the_image_size(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "ds", {"good": (32, 32), "bad": (64, 48)})
    run, result = _validate(tmp_path, root)
    doc = json.loads((run / "data" / "shortcut.json").read_text())
    assert doc["warn"] is True and doc["metadata"] == "image files" and doc["splits"] == ["train", "val"]
    assert "data.fit_mode=resize|center_crop" in doc["message"] and "normalise formats" in doc["message"]
    assert doc["top_feature"] in {"width", "height", "aspect"}
    assert result.shortcut is not None
    assert result.shortcut["warn"] is True and result.shortcut["top_feature"] == doc["top_feature"]
    assert ShortcutReport.from_dict(doc).warn


def test_validate_data_shortcut_check_can_be_disabled(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "ds", {"good": (32, 32), "bad": (64, 48)}, n=6)
    run, result = _validate(tmp_path, root, enabled=False)
    assert result.shortcut is None and not (run / "data" / "shortcut.json").exists()


# ---------------------------------------------------------------------------------------------------- report
def _render(path: Path, shortcut: ShortcutReport | None) -> str:
    classes = ("false_call", "open", "short")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = np.full((60, 3), 0.1)
    probs[np.arange(60), y] = 0.8
    metrics = classification_metrics(y, probs, classes, classes[0])
    gates = evaluate_gates(metrics, GateConfig())
    render_report(path, title="t", metrics=metrics, gates=gates, curves=pr_curves(y, probs, classes), info={},
                  shortcut=shortcut)
    return path.read_text()


def test_report_shows_the_shortcut_warning(tmp_path: Path) -> None:
    x, y = _sized_by_class(20)
    r = shortcut_check(x, NAMES, y, ["good", "<b>short</b>", "open"])
    html = _render(tmp_path / "warn.html", r)
    assert 'id="shortcut"' in html and "Shortcut check" in html and 'id="shortcut-alert"' in html
    assert "WARNING" in html and "data.fit_mode=resize|center_crop" in html
    assert f"{r.top_feature} (1.000)" in html and "&lt;b&gt;short&lt;/b&gt;" in html and "<b>short" not in html


def test_report_shortcut_section_when_quiet_or_absent(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = _rows(rng.choice([32, 64], 120), rng.choice([32, 64], 120), rng.integers(800, 1200, 120),
              rng.integers(0, 2, 120))
    quiet = _render(tmp_path / "quiet.html", shortcut_check(x, NAMES, y, CLASSES))
    assert 'id="shortcut"' in quiet and "metadata does not predict the class" in quiet
    assert 'id="shortcut-alert"' not in quiet and "WARNING" not in quiet
    note = _render(tmp_path / "note.html", ShortcutReport(note="not checked: only one class"))
    assert "not checked: only one class" in note
    assert 'id="shortcut"' not in _render(tmp_path / "none.html", None)
