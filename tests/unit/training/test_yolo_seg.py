"""YOLO segmentation datasets (training.yolo_seg): good = empty label file, polygons rasterised, bad labels named."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from defectops.training.yolo_seg import YoloSegError, rasterize, read_yolo_seg

KOLEKTOR = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "kolektorsdd" / "Datasets"


def _dataset(root: Path, labels: dict[str, str | None]) -> Path:
    for name, text in labels.items():
        split, stem = name.split("/")
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / split / f"{stem}.png"), np.zeros((8, 8, 3), np.uint8))
        if text is not None:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{stem}.txt").write_text(text)
    return root


def test_reads_good_and_defective_samples(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"train/a": "", "train/b": "0 0.1 0.1 0.5 0.1 0.5 0.5\n", "val/c": "\n"})
    samples = read_yolo_seg(root)
    assert [(s.path.stem, s.split, s.defective) for s in samples] == [("a", "train", False), ("b", "train", True),
                                                                       ("c", "val", False)]
    mask = rasterize(samples[1].polygons, 10, 10)
    assert mask.shape == (10, 10) and mask[2, 3] and not mask[8, 8]


@pytest.mark.parametrize(("text", "message"), [
    ("0 0.1 0.1 0.5\n", "at least 6"),
    ("0 a b c d e f\n", "not numbers"),
    ("0 0.1 0.1 1.5 0.1 0.5 0.5\n", "outside \\[0, 1\\]"),
])
def test_bad_label_lines_are_named(tmp_path: Path, text: str, message: str) -> None:
    root = _dataset(tmp_path, {"train/a": text})
    with pytest.raises(YoloSegError, match=message) as e:
        read_yolo_seg(root)
    assert "a.txt line 1" in str(e.value)


def test_missing_label_file_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(YoloSegError, match="no label file"):
        read_yolo_seg(_dataset(tmp_path / "d", {"train/a": None}))
    with pytest.raises(YoloSegError, match="no images/ folder"):
        read_yolo_seg(tmp_path / "empty")


def test_samples_keep_one_of_each_content_and_carve_a_test_split(tmp_path: Path) -> None:
    from defectops.training.yolo_seg import yolo_seg_samples

    root = _dataset(tmp_path, {f"train/{i:02d}": "" for i in range(40)} | {"val/v": ""})
    for i in range(40):  # distinct contents
        cv2.imwrite(str(root / "images" / "train" / f"{i:02d}.png"), np.full((8, 8, 3), i, np.uint8))
    cv2.imwrite(str(root / "images" / "val" / "v.png"), np.full((8, 8, 3), 200, np.uint8))
    (root / "images" / "train" / "copy.png").write_bytes((root / "images" / "train" / "03.png").read_bytes())
    (root / "labels" / "train" / "copy.txt").write_text("")
    samples = yolo_seg_samples(root, test=0.3, seed=0)
    assert len(samples) == 41 and "images/train/copy.png" not in {s["path"] for s in samples}
    splits = {s["split"] for s in samples}
    assert splits == {"train", "val", "test"}
    assert sum(s["split"] == "test" for s in samples) == sum(
        s["split"] == "test" for s in yolo_seg_samples(root, test=0.3, seed=0))  # deterministic


@pytest.mark.skipif(not KOLEKTOR.is_dir(), reason="needs ../shared/datasets/kolektorsdd")
def test_kolektorsdd_counts_match_its_datasheet() -> None:
    samples = read_yolo_seg(KOLEKTOR)
    counts = {(s.split, s.defective): 0 for s in samples}
    for s in samples:
        counts[(s.split, s.defective)] += 1
    assert counts == {("train", False): 278, ("train", True): 42, ("val", False): 69, ("val", True): 10}
