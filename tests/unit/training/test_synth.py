"""Tests for the synthetic DeepPCB board generator: determinism, box/pixel consistency and the on-disk layout."""

from __future__ import annotations

import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectops.core.taxonomy import DEFECT_TYPES
from defectops.training import synth
from defectops.training.candidates import read_deeppcb_annotations
from defectops.training.synth import BoardPair, generate_board, generate_boards, write_deeppcb_root

LIST_LINE = re.compile(r"^group(\d{5})/\1/(\1\d{3})\.jpg group\1/\1_not/\2\.txt$")


def _boards(n: int, seed: int = 7, size: int = 192, **kw: object) -> list[BoardPair]:
    return list(generate_boards(n, seed, size=size, **kw))


def _assert_same(a: BoardPair, b: BoardPair) -> None:
    assert np.array_equal(a.template, b.template)
    assert np.array_equal(a.tested, b.tested)
    assert a.boxes == b.boxes
    assert a.nuisance == b.nuisance


def test_generate_board_is_deterministic_per_seed() -> None:
    a = generate_board(np.random.default_rng(3), size=160)
    b = generate_board(np.random.default_rng(3), size=160)
    c = generate_board(np.random.default_rng(4), size=160)
    _assert_same(a, b)
    assert not np.array_equal(a.template, c.template)


def test_generate_boards_deterministic_and_prefix_stable() -> None:
    first = _boards(3, seed=11, size=160)
    again = _boards(3, seed=11, size=160)
    for a, b in zip(first, again, strict=True):
        _assert_same(a, b)
    prefix = _boards(2, seed=11, size=160)  # board i depends on (seed, i) only
    for a, b in zip(prefix, first[:2], strict=True):
        _assert_same(a, b)
    other = _boards(1, seed=12, size=160)[0]
    assert not np.array_equal(other.tested, first[0].tested)


@pytest.mark.parametrize("size", [128, 256])
def test_boxes_cover_exactly_the_changed_pixels(size: int) -> None:
    seen: set[str] = set()
    for board in _boards(10, seed=size, size=size):
        for img in (board.template, board.tested):
            assert img.shape == (size, size)
            assert img.dtype == np.uint8
            assert set(np.unique(img).tolist()) <= {0, 255}
        changed = board.template != board.tested
        covered = np.zeros_like(changed)
        all_boxes = board.boxes + board.nuisance
        for box in all_boxes:
            assert 0 <= box.x1 <= box.x2 < size
            assert 0 <= box.y1 <= box.y2 < size
            covered[box.y1 : box.y2 + 1, box.x1 : box.x2 + 1] = True
        assert not (changed & ~covered).any(), "a changed pixel lies outside every defect and nuisance box"
        for box in board.boxes:
            assert box.label in DEFECT_TYPES
            assert changed[box.y1 : box.y2 + 1, box.x1 : box.x2 + 1].any(), f"defect box without change: {box}"
            seen.add(box.label)
        assert all(box.label == "nuisance" for box in board.nuisance)
        assert len(board.boxes) <= 12
        assert len(board.nuisance) <= 4
        for i, a in enumerate(all_boxes):  # edits never overlap
            for b in all_boxes[i + 1 :]:
                assert a.x2 < b.x1 or b.x2 < a.x1 or a.y2 < b.y1 or b.y2 < a.y1, (a, b)
    if size == 256:
        assert seen == set(DEFECT_TYPES)


def test_box_margin_is_loose_but_bounded() -> None:
    board = generate_board(np.random.default_rng(5), size=640)
    changed = board.template != board.tested
    assert 3 <= len(board.boxes) <= 12
    for box in board.boxes:
        ys, xs = np.nonzero(changed[box.y1 : box.y2 + 1, box.x1 : box.x2 + 1])
        margins = (xs.min(), ys.min(), box.x2 - box.x1 - xs.max(), box.y2 - box.y1 - ys.max())
        for m, at_edge in zip(margins, (box.x1 == 0, box.y1 == 0, box.x2 == 639, box.y2 == 639), strict=True):
            assert m <= synth.BOX_MARGIN[1]
            assert at_edge or m >= synth.BOX_MARGIN[0]


def test_defect_rate_zero_gives_clean_boards() -> None:
    for board in _boards(4, seed=2, size=160, defect_rate=0.0):
        assert board.boxes == []


def test_defect_count_follows_range() -> None:
    counts = [len(b.boxes) for b in _boards(4, seed=9, size=256, defects=(2, 2), nuisance=(0, 0))]
    assert counts == [2, 2, 2, 2]
    for board in _boards(2, seed=9, size=256, nuisance=(0, 0)):
        assert board.nuisance == []
        inside = np.zeros(board.template.shape, dtype=bool)
        for box in board.boxes:
            inside[box.y1 : box.y2 + 1, box.x1 : box.x2 + 1] = True
        assert not ((board.template != board.tested) & ~inside).any()


def test_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size"):
        generate_board(rng, size=64)
    with pytest.raises(ValueError, match="defect_rate"):
        generate_board(rng, size=128, defect_rate=1.5)
    with pytest.raises(ValueError, match="defects"):
        generate_board(rng, size=128, defects=(5, 2))


def test_full_size_board_is_fast() -> None:
    rng = np.random.default_rng(1)
    generate_board(rng)  # warm-up (cv2 lazy init)
    start = time.perf_counter()
    for _ in range(3):
        generate_board(rng)
    assert (time.perf_counter() - start) / 3 < 0.2


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_deeppcb_root_layout_and_reproducibility(tmp_path: Path) -> None:
    calls: list[int] = []
    root = write_deeppcb_root(tmp_path / "a", 3, seed=21, size=128, defects=(2, 4), progress=calls.append)
    assert root == tmp_path / "a"
    assert calls == [1, 2, 3]
    lines = (root / "trainval.txt").read_text().splitlines()
    assert len(lines) == 3
    boards = _boards(3, seed=21, size=128, defects=(2, 4))
    for i, (line, board) in enumerate(zip(lines, boards, strict=True)):
        m = LIST_LINE.match(line)
        assert m, line
        assert m.group(1) == "90000"
        assert m.group(2) == f"90000{i:03d}"
        img_rel, ann_rel = line.split()
        stem = root / img_rel[: -len(".jpg")]
        for suffix, expected in (("_temp.jpg", board.template), ("_test.jpg", board.tested)):
            img = cv2.imread(str(stem) + suffix, cv2.IMREAD_UNCHANGED)
            assert img is not None
            assert img.shape == expected.shape
            assert np.mean((img >= 128) != (expected >= 128)) < 0.01  # JPEG q95 keeps the binary picture
        assert read_deeppcb_annotations(root / ann_rel) == board.boxes
    assert not list(root.rglob("*.tmp"))
    again = write_deeppcb_root(tmp_path / "b", 3, seed=21, size=128, defects=(2, 4))
    assert _tree_bytes(root) == _tree_bytes(again)


def test_write_deeppcb_root_spills_into_more_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "PAIRS_PER_GROUP", 2)
    root = write_deeppcb_root(tmp_path, 3, seed=1, size=128, group=500)
    lines = (root / "trainval.txt").read_text().splitlines()
    assert [LIST_LINE.match(line).group(2) for line in lines] == ["00500000", "00500001", "00501000"]  # type: ignore[union-attr]
    assert (root / "group00501" / "00501" / "00501000_test.jpg").is_file()



def test_layout_mirrors_real_list_format(deeppcb_root: Path) -> None:
    real = deeppcb_root
    lines = (real / "trainval.txt").read_text().splitlines()[:20]
    assert lines
    for line in lines:
        assert LIST_LINE.match(line), line
