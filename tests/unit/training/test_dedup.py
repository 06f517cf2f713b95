"""Duplicates in folder datasets: identical files share a split and are kept once per class, the same content under
two labels is quarantined by validation as a label conflict (and counted apart from broken files), near-identical
images are grouped into one split by a perceptual hash, and everything stays deterministic."""

from __future__ import annotations

import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.pipelines.context import Reporter, StepContext, StepError
from defectops.pipelines.steps.pull_data import pull_data
from defectops.pipelines.steps.validate_data import validate_data
from defectops.training.config import AnomalyConfig, DataConfig, DedupConfig, ValidationConfig
from defectops.training.dedup import hamming, near_components, phash
from defectops.training.importers import FolderImport, import_folder
from defectops.training.snapshot import fingerprint, load_snapshot, write_snapshot
from defectops.training.validation import validate_snapshot


def _texture(seed: int, side: int = 64) -> Image.Image:
    """A smooth random RGB image (8x8 random blocks, bilinear), like a crop with structure, not pixel noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize((side, side), Image.Resampling.BILINEAR)


def _save(path: Path, im: Image.Image, fmt: str = "PNG", **kw: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return path


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _import(root: Path, seed: int = 0, **kw: object) -> FolderImport:
    return import_folder(root, val=0.3, test=0.3, seed=seed, **kw)  # type: ignore[arg-type]


def test_a_duplicate_group_never_straddles_two_splits(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for k in range(40):
        first = _save(root / ("normal" if k % 2 else "short") / f"{k}.png", _texture(k, 16))
        for c in range(k % 3):  # 0, 1 or 2 more copies under other names, nested folders included
            _copy(first, first.parent / f"sub{c}" / f"copy {k}.png")
        if k % 10 == 0:  # the same content in the other class: a label conflict, still one split
            _copy(first, root / ("short" if k % 2 else "normal") / f"other {k}.png")
    splits_seen = set()
    for seed in range(25):
        found = _import(root, seed)
        by_content: dict[str, set[str]] = defaultdict(set)
        for s in found.samples:
            by_content[s["sha256"]].add(s["split"])
        assert all(len(splits) == 1 for splits in by_content.values()), seed
        splits_seen |= {sp for splits in by_content.values() for sp in splits}
        assert len(found.samples) == 40 + 4 and len(found.duplicates.dropped) == 39
    assert splits_seen == {"train", "val", "test"}


def test_copies_within_a_class_are_kept_once_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    a = _save(root / "normal" / "b.png", _texture(1))
    _copy(a, root / "normal" / "a.png")  # sorts first: it is the one kept
    _copy(a, root / "normal" / "z" / "c.png")
    x = _save(root / "short" / "x.png", _texture(2))
    _copy(x, root / "short" / "y.png")
    _save(root / "short" / "unique.png", _texture(3))
    found = _import(root)
    assert [s["path"] for s in found.samples] == ["normal/a.png", "short/unique.png", "short/x.png"]
    assert all("group" not in s for s in found.samples)  # nothing left with several files
    assert found.duplicates.dropped == [
        {"path": "normal/b.png", "kept": "normal/a.png", "label": "normal", "sha256": found.samples[0]["sha256"]},
        {"path": "normal/z/c.png", "kept": "normal/a.png", "label": "normal", "sha256": found.samples[0]["sha256"]},
        {"path": "short/y.png", "kept": "short/x.png", "label": "short", "sha256": found.samples[2]["sha256"]},
    ]
    assert found.duplicates.counts() == {"dropped": 3, "groups": 2, "near_groups": 0, "label_conflicts": 0,
                                         "leaks": 0}
    samples, classes, ignored = found  # still unpacks as before
    assert (samples, classes, ignored) == (found.samples, ["normal", "short"], [])
    assert "3 copies dropped" in found.duplicates.summary()


def test_a_label_conflict_is_quarantined_naming_both_labels(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for k in range(8):
        _save(root / "normal" / f"{k}.png", _texture(k))
        _save(root / "short" / f"{k}.png", _texture(100 + k))
    _copy(root / "normal" / "3.png", root / "short" / "looks normal.png")
    found = _import(root)
    assert found.duplicates.counts()["label_conflicts"] == 1
    assert found.duplicates.conflicts[0]["labels"] == ["normal", "short"]
    pair = [s for s in found.samples if s["path"] in ("normal/3.png", "short/looks normal.png")]
    assert len(pair) == 2 and pair[0]["split"] == pair[1]["split"] and pair[0]["group"] == pair[1]["group"]
    samples = [*found.samples, {**found.samples[0], "path": "normal/0.png"}]  # a same-split copy from elsewhere
    snap = write_snapshot(tmp_path / "snap", samples, found.classes, files_root=root)
    report = validate_snapshot(load_snapshot(snap.dir), ValidationConfig())
    reasons = {q.path: (q.kind, q.reason) for q in report.quarantined}
    assert reasons["short/looks normal.png"] == (
        "conflict", "label conflict: same content as normal/3.png labelled 'normal' (this copy: 'short')")
    assert reasons["normal/3.png"] == (
        "conflict", "label conflict: same content as short/looks normal.png labelled 'short' (this copy: 'normal')")
    assert reasons["normal/0.png"][0] == "duplicate" and "within the split" in reasons["normal/0.png"][1]
    assert len(reasons) == 3 and report.count("conflict") == 2
    assert report.bad_fraction == pytest.approx(1 / 18) and report.conflict_fraction == pytest.approx(2 / 18)
    assert report.to_dict()["label_conflicts"] == 2


def test_pre_split_folders_keep_their_split_and_report_leakage(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for k in range(3):
            _save(root / split / "normal" / f"{k}.png", _texture(k + (10 if split == "val" else 0)))
    _copy(root / "train" / "normal" / "0.png", root / "val" / "normal" / "same as train.png")
    found = _import(root)
    assert {s["path"]: s["split"] for s in found.samples}["val/normal/same as train.png"] == "val"
    assert found.duplicates.leaks == [{"sha256": found.samples[0]["sha256"], "splits": ["train", "val"],
                                       "paths": ["train/normal/0.png", "val/normal/same as train.png"]}]
    snap = write_snapshot(tmp_path / "snap", found.samples, found.classes, files_root=root)
    report = validate_snapshot(snap, ValidationConfig())
    assert [(q.path, q.kind) for q in report.quarantined] == [("val/normal/same as train.png", "leakage")]


class _Log(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _ctx(tmp_path: Path, name: str) -> tuple[StepContext, _Log]:
    log = _Log()
    return StepContext(name, tmp_path / name, tmp_path / "home", "x", log), log


def test_pull_and_validate_go_through_duplicates_and_a_conflict(tmp_path: Path) -> None:
    root = tmp_path / "solder"
    for k in range(60):
        _save(root / "normal" / f"n{k}.png", _texture(k, 12))
        _save(root / "bridge" / f"b{k}.png", _texture(1000 + k, 12))
    for k in range(0, 60, 6):
        _copy(root / "normal" / f"n{k}.png", root / "normal" / f"n{k} (copy).png")
    _copy(root / "bridge" / "b5.png", root / "normal" / "mislabelled.png")
    data = DataConfig(source="folder", root=str(root), good_class="normal")
    ctx, log = _ctx(tmp_path, "run")
    pulled = pull_data(ctx, data)
    assert pulled.samples == 121
    assert pulled.duplicates == {"dropped": 10, "groups": 11, "near_groups": 0, "label_conflicts": 1, "leaks": 0}
    listed = json.loads(ctx.path(RUN.duplicates).read_text())
    assert len(listed["dropped_files"]) == 10 and listed["conflicts"][0]["paths"] == ["bridge/b5.png",
                                                                                        "normal/mislabelled.png"]
    assert any("10 copies dropped" in line and "1 label conflicts" in line for line in log.lines)
    validated = validate_data(ctx, data, TaskKind.classify, AnomalyConfig())
    assert validated.label_conflicts == 2 and validated.quarantined == 2 and validated.accepted == 119
    assert any("2 label conflicts" in line for line in log.lines)

    mostly = tmp_path / "mostly"
    shutil.copytree(root / "normal", mostly / "normal")
    shutil.copytree(root / "normal", mostly / "bridge")  # every file under both labels
    data = DataConfig(source="folder", root=str(mostly), good_class="normal")
    ctx, _ = _ctx(tmp_path, "mostly")
    pull_data(ctx, data)
    with pytest.raises(StepError, match=r"label conflicts.*data\.validation\.max_conflict_fraction=0\.02"):
        validate_data(ctx, data, TaskKind.classify, AnomalyConfig())


def _near_copy(src: Image.Image, path: Path) -> Path:
    """``src`` 8 % brighter, re-encoded as a JPEG."""
    return _save(path, ImageEnhance.Brightness(src).enhance(1.08), "JPEG", quality=90)


def test_near_duplicates_are_grouped_into_one_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for k in range(20):
        _save(root / "normal" / f"{k}.png", _texture(k))
        _save(root / "short" / f"{k}.png", _texture(50 + k))
    _near_copy(_texture(3), root / "normal" / "3 brighter.jpg")
    _near_copy(_texture(51), root / "normal" / "51 brighter.jpg")  # a near copy under the other label: grouped
    plain = _import(root)
    assert all("group" not in s for s in plain.samples)
    for seed in range(15):
        found = _import(root, seed, dedup=DedupConfig(near=True))
        groups: dict[str, list[dict]] = defaultdict(list)
        for s in found.samples:
            if "group" in s:
                groups[s["group"]].append(s)
        assert sorted(sorted(s["path"] for s in g) for g in groups.values()) == [
            ["normal/3 brighter.jpg", "normal/3.png"], ["normal/51 brighter.jpg", "short/1.png"]]
        assert all(len({s["split"] for s in g}) == 1 for g in groups.values())
        assert found.duplicates.counts()["near_groups"] == 2 and len(found.samples) == 42
        assert [g["kind"] for g in found.duplicates.groups] == ["near", "near"]


def test_crops_keep_the_group_for_the_bootstrap(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for k in range(12):
        _save(root / "normal" / f"{k}.png", _texture(k))
        _save(root / "short" / f"{k}.png", _texture(50 + k))
    _near_copy(_texture(3), root / "normal" / "3 brighter.jpg")
    data = DataConfig(source="folder", root=str(root), good_class="normal", dedup=DedupConfig(near=True))
    ctx, _ = _ctx(tmp_path, "run")
    pull_data(ctx, data)
    validate_data(ctx, data, TaskKind.classify, AnomalyConfig())
    by_source = {c["source"]: c for c in load_snapshot(ctx.path(RUN.crops)).samples}
    group = by_source["normal/3.png"]["group"]
    assert by_source["normal/3 brighter.jpg"]["group"] == group
    assert sum(1 for c in by_source.values() if "group" in c) == 2


def test_hashes_groups_and_fingerprints_are_deterministic(tmp_path: Path) -> None:
    im = np.asarray(_texture(7))
    assert phash(im) == phash(im.copy()) and 0 <= phash(im) < 2**64
    assert hamming(phash(im), phash(np.asarray(_texture(8)))) > 10
    assert near_components([0b0, 0b111, 0b111111, 2**64 - 1], 3) == [0, 0, 0, 3]  # joined through the middle one
    with pytest.raises(ValueError, match=r"max_distance=65"):
        near_components([1], 65)
    root = tmp_path / "a" / "ds"
    for k in range(10):
        _save(root / "ok" / f"{k}.png", _texture(k))
        _near_copy(_texture(k), root / "bad" / f"{k}.jpg")
    _copy(root / "ok" / "0.png", root / "ok" / "again.png")
    first = fingerprint(*_import(root, dedup=DedupConfig(near=True))[:2])
    assert fingerprint(*_import(root, dedup=DedupConfig(near=True))[:2]) == first
    shutil.copytree(root, tmp_path / "b" / "ds")
    assert fingerprint(*_import(tmp_path / "b" / "ds", dedup=DedupConfig(near=True))[:2]) == first
    assert fingerprint(*_import(root)[:2]) != first  # the near groups are part of the manifest
    with pytest.raises(ValueError, match=r"dedup.max_distance=-1"):
        _import(root, dedup=DedupConfig(near=True, max_distance=-1))
