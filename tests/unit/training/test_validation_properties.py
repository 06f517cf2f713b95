"""Property-based tests (hypothesis) of the image validators and the folder importer: whatever the bytes, names and
symlinks, nothing crashes, everything bad is quarantined with a non-empty reason, and good files pass.

Small images and modest ``max_examples`` keep the whole file well under 30 s on two busy cores; each example works in
a fresh folder under one ``tmp_path_factory`` base (hypothesis runs many examples per test function)."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from defectops.training.config import ValidationConfig
from defectops.training.images import load_image
from defectops.training.importers import import_folder
from defectops.training.snapshot import write_snapshot
from defectops.training.validation import check_image, validate_snapshot

CFG = ValidationConfig()
PROPS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
_counter = itertools.count()


def _encoded(fmt: str, seed: int = 0, h: int = 10, w: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


GOOD = {"PNG": _encoded("PNG"), "JPEG": _encoded("JPEG")}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


def _fresh(base: Path) -> Path:
    d = base / f"ex{next(_counter)}"
    d.mkdir()
    return d


def _check(path: Path, root: Path | None = None) -> tuple[str | None, str]:
    problem, digest = check_image(path, CFG, root=root)
    assert problem is None or (isinstance(problem, str) and problem.strip()), problem
    return problem, digest


@PROPS
@given(fmt=st.sampled_from(sorted(GOOD)), data=st.data())
def test_every_truncation_of_a_valid_image_is_quarantined(base: Path, fmt: str, data: st.DataObject) -> None:
    whole = GOOD[fmt]
    cut = data.draw(st.integers(0, len(whole) - 1), label="cut")
    path = _fresh(base) / f"x.{fmt.lower()}"
    path.write_bytes(whole[:cut])
    problem, _ = _check(path)
    assert problem, f"{fmt} cut at {cut} of {len(whole)} passed"


@PROPS
@given(fmt=st.sampled_from(sorted(GOOD)), keep=st.integers(2, 64), junk=st.binary(min_size=0, max_size=400))
def test_random_bytes_after_a_valid_header_never_crash_and_pass_only_if_decodable(
        base: Path, fmt: str, keep: int, junk: bytes) -> None:
    path = _fresh(base) / f"x.{fmt.lower()}"
    path.write_bytes(GOOD[fmt][:keep] + junk)
    problem, _ = _check(path)
    if problem is None:  # accepted: then training's decoder reads it
        assert load_image(path, max_pixels=CFG.max_image_pixels) is not None
    if fmt == "PNG":  # chunk CRCs: random bytes never make a PNG
        assert problem


@PROPS
@given(fmt=st.sampled_from(sorted(GOOD)))
def test_good_files_pass(base: Path, fmt: str) -> None:
    path = _fresh(base) / f"x.{fmt.lower()}"
    path.write_bytes(GOOD[fmt])
    assert _check(path, root=path.parent) == (None, _check(path)[1])


_NAME_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="/\x00\\")


@st.composite
def _names(draw: st.DrawFn) -> str:
    """File stems: unicode, spaces, leading dots, up to the 255-byte limit of a name with its ``.png``."""
    stem = draw(st.one_of(st.text(_NAME_CHARS, min_size=1, max_size=30),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="/\\"),
                                  min_size=200, max_size=251),
                          st.from_regex(r"\A[ .]{0,3}[a-z ]{1,8}\Z")))
    assume(len((stem + ".png").encode("utf-8")) <= 255 and stem not in (".", ".."))
    return stem + ".png"


@settings(PROPS, max_examples=25)
@given(names=st.lists(_names(), min_size=1, max_size=4, unique_by=lambda n: n.lower()),
       broken=st.lists(st.booleans(), min_size=4, max_size=4))
def test_import_and_validate_any_file_names(base: Path, names: list[str], broken: list[bool]) -> None:
    root = _fresh(base) / "ds"
    (root / "other").mkdir(parents=True)
    (root / "other" / "o.png").write_bytes(_encoded("PNG", 99))
    written = {}
    for k, (name, bad) in enumerate(zip(names, broken, strict=False)):
        try:
            (root / "cls" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "cls" / name).write_bytes(_encoded("PNG", k)[:-20] if bad else _encoded("PNG", k))
        except OSError:  # a name this file system refuses (normalising file systems, byte limits)
            continue
        written[name] = bad
    visible = {n: bad for n, bad in written.items() if not n.startswith(".")}
    assume(visible)
    found = import_folder(root, val=0.0, test=0.0, seed=0)
    for n in written:
        assert (f"cls/{n}" in {s["path"] for s in found.samples}) == (n in visible)
        assert (f"cls/{n}" in found.ignored) == (n not in visible)
    snap = write_snapshot(root.parent / "snap", found.samples, found.classes, files_root=root)
    report = validate_snapshot(snap, CFG)
    reasons = {q.path: q.reason for q in report.quarantined}
    assert all(r.strip() for r in reasons.values())
    for n, bad in visible.items():
        assert (f"cls/{n}" in reasons) == bad, (n, reasons)


@settings(PROPS, max_examples=30)
@given(links=st.lists(st.tuples(st.sampled_from(["file-in", "file-out", "dir-in", "dir-out", "dangling-out",
                                                  "rel-out"]),
                                st.sampled_from(["PNG", "JPEG", "junk"])), min_size=1, max_size=5))
def test_symlinks_inside_the_root_pass_and_links_out_are_quarantined_unopened(
        base: Path, links: list[tuple[str, str]]) -> None:
    top = _fresh(base)
    root, outside = top / "ds", top / "outside"
    for d in (root / "cls", root / "store", outside):
        d.mkdir(parents=True)
    samples, expect = [], {}
    for k, (how, fmt) in enumerate(links):
        content = _encoded(fmt, k) if fmt != "junk" else b"not an image"
        target_dir = root / "store" if how.endswith("-in") else outside
        (target_dir / f"t{k}.img").write_bytes(content)
        (target_dir / f"d{k}").mkdir()
        (target_dir / f"d{k}" / "x.img").write_bytes(content)
        link = root / "cls" / f"l{k}"
        try:
            if how.startswith("file"):
                link.symlink_to(target_dir / f"t{k}.img")
                rel = f"cls/l{k}"
            elif how.startswith("dir"):
                link.symlink_to(target_dir / f"d{k}", target_is_directory=True)
                rel = f"cls/l{k}/x.img"
            elif how == "dangling-out":
                link.symlink_to(outside / f"gone{k}")
                rel = f"cls/l{k}"
            else:
                link.symlink_to(Path("..") / ".." / "outside" / f"t{k}.img")
                rel = f"cls/l{k}"
        except OSError:
            pytest.skip("symlinks are not available here")
        samples.append({"path": rel, "label": "cls", "split": "train"})
        expect[rel] = "out" if how.endswith("out") else ("good" if fmt != "junk" else "bad")
    snap = write_snapshot(top / "snap", samples, ["cls"], files_root=root)
    outside_atime = {p: p.stat().st_atime_ns for p in outside.rglob("*") if p.is_file()}
    report = validate_snapshot(snap, CFG)
    reasons = {q.path: q.reason for q in report.quarantined}
    accepted = {snap.samples[i]["path"] for i in report.accepted}
    for rel, what in expect.items():
        if what == "good":
            assert rel in accepted, reasons.get(rel)
        else:
            assert rel in reasons and reasons[rel].strip()
        if what == "out":
            assert "escapes the dataset root" in reasons[rel], reasons[rel]
    assert os.path.isdir(outside) and outside_atime == {p: p.stat().st_atime_ns for p in outside_atime}
