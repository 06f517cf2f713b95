"""Folder-per-class datasets: importing hostile layouts, decoding every common image kind, square fitting, crop
snapshots identical to what prediction sees, and validation quarantining each kind of broken file with a reason."""

from __future__ import annotations

import io
import os
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from defectops.training.config import ValidationConfig
from defectops.training.data import load_split, to_tensor
from defectops.training.images import (
    FIT_MODES,
    ImageError,
    build_image_crops,
    fit_to_square,
    jpeg_is_truncated,
    load_image,
    preprocess_for_model,
)
from defectops.training.importers import FolderImport, import_folder
from defectops.training.snapshot import Snapshot, assign_split, fingerprint, load_snapshot, write_snapshot
from defectops.training.validation import validate_snapshot

VAL, TEST, SEED = 0.2, 0.2, 0
RNG = np.random.default_rng(0)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _encode(arr: np.ndarray, ext: str) -> bytes:
    """Encode an RGB(A) or gray array with OpenCV (which wants BGR order)."""
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = np.concatenate([arr[:, :, 2::-1], arr[:, :, 3:]], axis=2)
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr))
    assert ok
    return buf.tobytes()


def _img(path: Path, h: int = 24, w: int = 32, ext: str | None = None, channels: int = 3) -> Path:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return _write(path, _encode(RNG.integers(0, 256, shape, dtype=np.uint8), ext or path.suffix))


def _pil(path: Path, im: Image.Image, fmt: str) -> Path:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return _write(path, buf.getvalue())


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w x h`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _dataset(root: Path) -> Path:
    for cls in ("normal", "short", "insufficient"):
        for k in range(6):
            _img(root / cls / f"{k}.png", 20 + k, 30)
    return root


def _import(root: Path, good_class: str | None = None) -> FolderImport:
    return import_folder(root, val=VAL, test=TEST, seed=SEED, good_class=good_class)


def _snapshot(tmp_path: Path, root: Path, good_class: str | None = None) -> tuple[Snapshot, list[dict[str, Any]]]:
    samples, classes, _ = _import(root, good_class)
    return write_snapshot(tmp_path / "snap", samples, classes, files_root=root), samples


# ------------------------------------------------------------------------------------------------------- import
def test_hostile_names_are_indexed_with_their_real_names_and_open(tmp_path: Path) -> None:
    root = tmp_path / "solder joints"
    nfd_class = unicodedata.normalize("NFD", "étain")
    names = {
        "normal": ["défaut (1) 测试.png", "-leading dash.png", "a b (c).JPG", "x" * 200 + ".png",
                   "sub dir/deeper (2)/nested.tif"],
        "short circuit (bridge)": ["[1] {a}; b=c & d.jpeg", unicodedata.normalize("NFD", "défaut.bmp")],
        nfd_class: ["0.png"],
    }
    for cls, files in names.items():
        for f in files:
            _img(root / cls / f, ext=Path(f).suffix.lower())
    samples, classes, ignored = _import(root)
    assert ignored == []
    assert classes == sorted(["normal", "short circuit (bridge)", "étain"])
    expected = {f"{cls}/{f}" for cls, files in names.items() for f in files}
    assert {s["path"] for s in samples} == expected  # real on-disk names, NFD included, POSIX separators
    for s in samples:
        assert s["source"] == "folder:solder joints"
        assert s["label"] == unicodedata.normalize("NFC", s["path"].split("/")[0])
        assert s["split"] in ("train", "val", "test")
        assert s["split"] == assign_split(s["sha256"], VAL, TEST, SEED)  # split by content: copies share it
        assert "group" not in s
        assert load_image(root / s["path"]).shape == (24, 32, 3)
    snap = write_snapshot(tmp_path / "snap", samples, classes, files_root=root)
    report = validate_snapshot(load_snapshot(tmp_path / "snap"), ValidationConfig())
    assert len(report.accepted) == len(samples) and not report.quarantined
    assert snap.classes == tuple(classes)


def test_hidden_junk_and_non_images_are_ignored_and_reported(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    _write(root / ".DS_Store", b"x")
    _write(root / "README.md", b"# notes")
    _img(root / "stray.png")
    _img(root / ".cache" / "normal" / "9.png")
    _img(root / "__MACOSX" / "normal" / "._0.png")
    _write(root / "normal" / ".hidden.png", b"x")
    _write(root / "normal" / "labels.csv", b"a,b")
    _img(root / "short" / ".thumbs" / "t.png")
    samples, classes, ignored = _import(root)
    assert classes == ["insufficient", "normal", "short"]
    assert len(samples) == 18
    assert ignored == sorted([".DS_Store", "README.md", "stray.png", ".cache/", "__MACOSX/", "normal/.hidden.png",
                              "normal/labels.csv", "short/.thumbs/"])


def test_pre_split_layout_uses_the_folders_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split, n in (("train", 4), ("Valid", 2), ("test", 3)):
        for cls in ("ok", "bad"):
            for k in range(n):
                _img(root / split / cls / f"{k}.png")
    samples, classes, _ = _import(root, good_class="ok")
    assert classes == ["ok", "bad"]
    counts = {sp: sum(1 for s in samples if s["split"] == sp) for sp in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 4, "test": 6}
    assert all(s["path"].split("/")[1] == s["label"] for s in samples)

    _img(root / "extra_class" / "0.png")
    with pytest.raises(ValueError, match=r"mixes split folders"):
        _import(root)
    shutil.rmtree(root / "extra_class")
    _img(root / "test" / "only_in_test" / "0.png")
    with pytest.raises(ValueError, match=r"'only_in_test' has no images under the train folder"):
        _import(root)


def test_bad_layouts_are_clear_errors(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    (root / "missing").mkdir()
    _write(root / "missing" / "notes.txt", b"x")
    with pytest.raises(ValueError, match=r"missing holds no images"):
        _import(root)
    shutil.rmtree(root / "missing")
    with pytest.raises(ValueError, match=r"good_class 'false_call' is not a class folder.*'insufficient', 'normal'"):
        _import(root, good_class="false_call")
    assert _import(root, good_class="normal").classes == ["normal", "insufficient", "short"]
    flat = tmp_path / "flat"
    _img(flat / "0.png")
    with pytest.raises(ValueError, match=r"has no class folders"):
        _import(flat)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        _import(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"split fractions"):
        import_folder(root, val=0.6, test=0.5, seed=0)


def test_fingerprint_is_stable_and_sees_renames(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "a" / "ds")
    first = fingerprint(*_import(root)[:2])
    assert fingerprint(*_import(root)[:2]) == first
    copy = tmp_path / "b" / "ds"
    shutil.copytree(root, copy)
    assert fingerprint(*_import(copy)[:2]) == first  # wherever the files live
    before = {s["path"]: s["split"] for s in _import(root).samples}
    _img(root / "normal" / "new.png")
    after = {s["path"]: s["split"] for s in _import(root).samples}
    assert {p: after[p] for p in before} == before  # adding a file moves no other file between splits
    (root / "normal" / "new.png").unlink()
    (root / "short" / "0.png").rename(root / "short" / "0 renamed.png")
    assert fingerprint(*_import(root)[:2]) != first


# -------------------------------------------------------------------------------------------------- decoding
def test_every_kind_of_image_decodes_to_8_bit_rgb(tmp_path: Path) -> None:
    red = np.zeros((5, 7, 3), np.uint8)
    red[..., 0] = 255
    files = {
        "rgb.png": _encode(red, ".png"),
        "rgb.jpg": _encode(red, ".jpg"),
        "rgb.bmp": _encode(red, ".bmp"),
        "rgb8.tif": _encode(red, ".tif"),
        "rgba.png": _encode(np.dstack([red, np.zeros((5, 7), np.uint8)]), ".png"),
        "gray.png": _encode(np.full((5, 7), 77, np.uint8), ".png"),
        "gray16.png": _encode(np.full((5, 7), 257 * 100, np.uint16), ".png"),
        "gray16.tif": _encode(np.full((5, 7), 65535, np.uint16), ".tif"),
        "rgb16.tif": _encode(np.dstack([np.full((5, 7), 65535, np.uint16), np.zeros((5, 7, 2), np.uint16)]), ".tif"),
    }
    for name, data in files.items():
        _write(tmp_path / name, data)
    _pil(tmp_path / "palette.png", Image.fromarray(red).convert("P"), "PNG")
    _pil(tmp_path / "gray16_pil.tif", Image.fromarray(np.full((5, 7), 1000, np.uint16)), "TIFF")
    expect = {"gray.png": 77, "gray16.png": 100, "gray16.tif": 255, "gray16_pil.tif": round(1000 / 257)}
    for path in sorted(tmp_path.iterdir()):
        img = load_image(path)
        assert img.dtype == np.uint8 and img.shape == (5, 7, 3), path.name
        if path.name in expect:
            assert (img == expect[path.name]).all(), path.name
        else:  # colour order kept: red stays red (JPEG within its loss)
            assert np.abs(img.astype(int) - red).max() <= 2, path.name


def test_unusable_images_raise_errors_naming_the_file(tmp_path: Path) -> None:
    cases = {
        "empty.png": (b"", "empty"),
        "noise.png": (RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a readable image"),
        "bomb.png": (_bomb_png(100_000, 100_000), "decompression bomb"),
        "float.tif": (_encode(np.ones((4, 4), np.float32), ".tif"), "float32 samples"),
    }
    for name, (data, words) in cases.items():
        with pytest.raises(ImageError, match=words) as err:
            load_image(_write(tmp_path / name, data))
        assert name in str(err.value)
    big = _img(tmp_path / "big.png", 100, 100)
    with pytest.raises(ImageError, match=r"100x100, over max_pixels=1000"):
        load_image(big, max_pixels=1000)
    with pytest.raises(ImageError, match=r"missing.png does not exist"):
        load_image(tmp_path / "missing.png")


def test_truncated_jpeg_detection(tmp_path: Path) -> None:
    jpg = _encode(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8), ".jpg")
    assert not jpeg_is_truncated(jpg)
    assert not jpeg_is_truncated(jpg + b"camera trailer \xff\xd8 data")  # bytes after end-of-image are fine
    assert not jpeg_is_truncated(_encode(np.zeros((4, 4), np.uint8), ".png"))
    for cut in (2, 100, len(jpg) // 2):
        assert jpeg_is_truncated(jpg[:-cut]), cut
    with pytest.raises(ImageError, match=r"cut.jpg is .*truncated"):
        load_image(_write(tmp_path / "cut.jpg", jpg[:-2]))


# -------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("h", "w"), [(8, 200), (1000, 30), (64, 64), (3, 3)])
def test_fit_to_square_geometry(h: int, w: int) -> None:
    img = np.full((h, w, 3), 200, np.uint8)
    for mode in FIT_MODES:
        out = fit_to_square(img, 64, mode)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (fit_to_square(img, 64, "resize") == 200).all()
    assert (fit_to_square(img, 64, "center_crop") == 200).all()
    box = fit_to_square(img, 64, "letterbox")
    rows, cols = np.flatnonzero(box.any(axis=(1, 2))), np.flatnonzero(box.any(axis=(0, 2)))
    nh, nw = max(1, round(h * 64 / max(h, w))), max(1, round(w * 64 / max(h, w)))
    assert (len(rows), len(cols)) == (nh, nw)  # aspect ratio kept, longer side = 64
    assert rows[0] == (64 - nh) // 2 and cols[0] == (64 - nw) // 2  # centred on black padding
    assert (box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] == 200).all()


def test_center_crop_keeps_the_middle_and_letterbox_the_whole() -> None:
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:200] = (0, 255, 0)
    img[:, 200:] = (0, 0, 255)
    assert (fit_to_square(img, 50, "center_crop") == (0, 255, 0)).all()
    box = fit_to_square(img, 60, "letterbox")
    assert (box[20:40, :20] == (255, 0, 0)).all() and (box[20:40, 40:] == (0, 0, 255)).all()
    assert not box[:20].any() and not box[40:].any()
    gray = fit_to_square(np.full((10, 40), 9, np.uint8), 16, "letterbox")
    assert gray.shape == (16, 16) and gray[8, 8] == 9
    with pytest.raises(ValueError, match=r"fit mode 'stretch' is unknown"):
        fit_to_square(img, 50, "stretch")
    with pytest.raises(ValueError, match=r"size 0 is not a positive"):
        fit_to_square(img, 0, "resize")


# ----------------------------------------------------------------------------------------------- crop snapshot
@pytest.mark.parametrize("mode", FIT_MODES)
def test_image_crops_train_on_exactly_what_prediction_sees(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "ds"
    shapes = [(8, 200), (1000, 30), (50, 50), (17, 90)]
    for cls in ("normal", "short"):
        for k, (h, w) in enumerate(shapes):
            _img(root / cls / f"{k} ({cls}).png", h, w)
        _write(root / cls / "gray16.tif", _encode(RNG.integers(0, 65536, (33, 21), dtype=np.uint16), ".tif"))
        _img(root / cls / "rgba.png", 40, 12, channels=4)
        _img(root / cls / "photo.jpg", 30, 45)
    snap, samples = _snapshot(tmp_path, root, good_class="normal")
    report = validate_snapshot(snap, ValidationConfig())
    assert len(report.accepted) == len(samples) == 14
    ticks: list[int] = []
    crops = build_image_crops(snap, report.accepted, tmp_path / "crops", 32, mode, progress=ticks.append)
    assert sum(ticks) == 14
    crops = load_snapshot(tmp_path / "crops")
    assert crops.classes == ("normal", "short")
    for c in crops.samples:
        i = int(Path(c["path"]).stem)
        assert c["path"] == f"crops/{c['split']}/{i}.png"
        assert (c["label"], c["split"], c["source"], c["origin"]) == (
            snap.samples[i]["label"], snap.samples[i]["split"], snap.samples[i]["path"], "image")
    for split in ("train", "val", "test"):
        images, labels, paths = load_split(crops, split)
        if not paths:
            continue
        sources = [snap.file(next(c["source"] for c in crops.samples if c["path"] == p)) for p in paths]
        x = preprocess_for_model(sources, 32, mode)
        assert x.shape == (len(paths), 3, 32, 32) and x.dtype == np.float32
        assert np.array_equal(x, to_tensor(images).numpy())  # bit-identical to the training tensors
        assert list(labels) == [crops.classes.index(c["label"]) for p in paths
                                for c in crops.samples if c["path"] == p]


# ------------------------------------------------------------------------------------------------ validation
def test_validation_quarantines_each_broken_file_with_a_reason(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    good_png = (root / "normal" / "0.png").read_bytes()
    jpg = _encode(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8), ".jpg")
    broken = {
        "normal/zero.png": (b"", "zero-byte"),
        "normal/cut.png": (good_png[: len(good_png) // 2], "truncated"),
        "short/cut.jpg": (jpg[:-2], "truncated"),
        "short/half.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "short/noise.png": (RNG.integers(0, 256, 300, dtype=np.uint8).tobytes(), "not a readable image"),
        "insufficient/bomb.png": (_bomb_png(100_000, 100_000), "decompression bomb"),
        "insufficient/big.png": (_encode(np.zeros((1200, 1000), np.uint8), ".png"), "max_image_pixels"),
    }
    for rel, (data, _) in broken.items():
        _write(root / rel, data)
    _write(root / "normal" / "copy of 0.png", good_png)
    found = _import(root)
    samples, classes = found.samples, found.classes
    assert [d["path"] for d in found.duplicates.dropped] == ["normal/copy of 0.png"]  # kept once by the importer
    by_path = {s["path"]: s for s in samples}
    by_path["normal/1.png"]["label"] = "tombstone"
    by_path["normal/2.png"]["split"] = "holdout"
    original = by_path["normal/0.png"]
    samples.append({**original, "path": "normal/copy of 0.png",  # as a snapshot built elsewhere could have it
                    "split": "test" if original["split"] != "test" else "train"})
    samples.append({**original, "path": "../outside.png"})
    snap = write_snapshot(tmp_path / "snap", samples, classes, files_root=root)
    snap = load_snapshot(tmp_path / "snap")
    report = validate_snapshot(snap, ValidationConfig(max_image_pixels=1_000_000))
    assert len(report.accepted) + len(report.quarantined) == report.total == len(samples)
    reasons = {q.path: q.reason for q in report.quarantined}
    expected = {rel: words for rel, (_, words) in broken.items()}
    expected |= {"normal/copy of 0.png": "leakage", "../outside.png": "escapes the dataset root",
                 "normal/1.png": "unknown label 'tombstone'", "normal/2.png": "unknown split 'holdout'"}
    assert set(reasons) == set(expected)
    for rel, words in expected.items():
        assert words in reasons[rel], (rel, reasons[rel])
    accepted = {snap.samples[i]["path"] for i in report.accepted}
    assert "normal/0.png" in accepted and len(accepted) == 18 - 2


def test_symlinks_inside_are_followed_once_links_out_are_never_followed(tmp_path: Path) -> None:
    """Issue 17 reversed the old behaviour (a class folder linked from elsewhere was imported): dataset roots are
    closed, so a link out is reported and never followed; links inside the root still are, once."""
    root = _dataset(tmp_path / "ds")
    elsewhere = tmp_path / "elsewhere"
    _img(elsewhere / "a.png")
    try:
        (root / "linked").symlink_to(elsewhere, target_is_directory=True)
        (root / "normal" / "loop").symlink_to(root / "normal", target_is_directory=True)
        (root / "short" / "dangling.png").symlink_to(tmp_path / "gone.png")
        (root / "short" / "inside.png").symlink_to(root / "normal" / "0.png")
        (root / "short" / "dangling inside.png").symlink_to(root / "gone.png")
    except OSError:
        pytest.skip("symlinks are not available here")
    found = _import(root)
    by_path = {s["path"]: s for s in found.samples}
    assert "linked" not in found.classes and not any(p.startswith("linked/") for p in by_path)
    assert found.ignored == ["linked", "normal/loop/", "short/dangling inside.png"]
    assert set(found.escaped) == {"linked", "short/dangling.png"}
    assert found.escaped["linked"] == f"escapes the dataset root (symlink to {elsewhere.resolve()})"
    assert "sha256" not in by_path["short/dangling.png"]  # never opened; validation quarantines it
    assert by_path["short/inside.png"]["sha256"] == by_path["normal/0.png"]["sha256"]  # a link inside is a file


def test_names_that_are_not_utf8_are_refused_or_reported(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    try:
        Path(os.fsdecode(bytes(root / "normal") + b"/notes\xff.txt")).write_bytes(b"x")
    except (OSError, UnicodeError):
        pytest.skip("this file system only takes UTF-8 names")
    assert _import(root).ignored == ["normal/notes\\xff.txt"]
    Path(os.fsdecode(bytes(root / "short") + b"/bad\xff.png")).write_bytes(_encode(np.zeros((4, 4), np.uint8), ".png"))
    with pytest.raises(ValueError, match=r"name 'short/bad\\xff.png' in .* is not valid UTF-8: rename it"):
        _import(root)
