"""Issue 17: dataset roots are closed (a path or symlink leading outside is quarantined with the reason and never
opened; links inside are fine) and a few bad files do not stop training (the bad-file budget: 1 % of the samples,
never more than 10 % of the smallest class)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectops.core.layout import RUN
from defectops.core.taxonomy import DEFECT_TYPES, TaskKind
from defectops.pipelines.context import Reporter, StepContext, StepError
from defectops.pipelines.steps.pull_data import pull_data
from defectops.pipelines.steps.validate_data import validate_data
from defectops.training.config import AnomalyConfig, DataConfig, DataSource, SplitConfig, ValidationConfig
from defectops.training.importers import import_folder
from defectops.training.snapshot import PathEscapesRoot, deeppcb_samples, escape_reason, load_snapshot, write_snapshot
from defectops.training.validation import bad_file_budget, check_image, validate_snapshot
from defectops.training.yolo_seg import yolo_seg_samples


def _png(path: Path, seed: int = 0, side: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except OSError:
        pytest.skip("symlinks are not available here")


def _secret(tmp_path: Path) -> Path:
    """A file outside every dataset root that must never be opened (it is not even an image)."""
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return secret


def _dataset(root: Path, per_class: int = 12) -> Path:
    for k in range(per_class):
        _png(root / "normal" / f"n{k}.png", k)
        _png(root / "short" / f"s{k}.png", 1000 + k)
    return root


# --- dataset roots are closed ---------------------------------------------------------------------------------------

def test_escape_reason_names_the_link_and_its_target(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", 2)
    secret = _secret(tmp_path)
    _link(root / "normal" / "passwd.png", secret)
    _link(root / "normal" / "outdir", secret.parent)
    _link(root / "normal" / "inside.png", root / "short" / "s0.png")
    _link(root / "normal" / "relative.png", Path("../short/s1.png"))  # relative, stays inside
    _link(root / "alias", root / "short")
    assert escape_reason(root, "normal/passwd.png") == f"escapes the dataset root (symlink to {secret.resolve()})"
    assert escape_reason(root, "normal/outdir/passwd") == (
        f"escapes the dataset root (normal/outdir is a symlink to {secret.parent.resolve()})")
    assert escape_reason(root, "../outside/passwd") == "escapes the dataset root ('..' in the path)"
    assert escape_reason(root, str(secret)) == "escapes the dataset root (absolute path)"
    for inside in ("normal/n0.png", "normal/inside.png", "normal/relative.png", "alias/s0.png", "normal/missing.png"):
        assert escape_reason(root, inside) is None, inside


def test_a_link_to_a_system_file_is_quarantined_and_never_opened(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = _dataset(tmp_path / "ds", 2)
    secret = _secret(tmp_path)
    _link(root / "normal" / "passwd.png", secret)
    _link(root / "short" / "outdir", secret.parent)
    _link(root / "short" / "inside.png", root / "normal" / "n1.png")
    samples = [{"path": "normal/n0.png", "label": "normal", "split": "train"},
               {"path": "normal/passwd.png", "label": "normal", "split": "train"},
               {"path": "short/outdir/passwd", "label": "short", "split": "train"},
               {"path": "short/inside.png", "label": "short", "split": "val"},
               {"path": "../outside/passwd", "label": "short", "split": "train"}]
    snap = load_snapshot(write_snapshot(tmp_path / "snap", samples, ["normal", "short"], files_root=root).dir)

    opened: list[str] = []
    real_open = Image.open

    def spy(fp: object, *a: object, **kw: object) -> Image.Image:
        opened.append(str(fp))
        return real_open(fp, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    report = validate_snapshot(snap, ValidationConfig())
    reasons = {q.path: q.reason for q in report.quarantined}
    assert reasons == {
        "normal/passwd.png": f"path 'normal/passwd.png' escapes the dataset root (symlink to {secret.resolve()})",
        "short/outdir/passwd": (f"path 'short/outdir/passwd' escapes the dataset root (short/outdir is a symlink to "
                                f"{secret.parent.resolve()})"),
        "../outside/passwd": "path '../outside/passwd' escapes the dataset root ('..' in the path)"}
    assert [snap.samples[i]["path"] for i in report.accepted] == ["normal/n0.png", "short/inside.png"]
    assert not any("passwd" in p for p in opened)  # before the fix: opened and reported "not a readable image"
    with pytest.raises(PathEscapesRoot, match="symlink to"):
        snap.file("normal/passwd.png")
    problem, digest = check_image(root / "normal" / "passwd.png", ValidationConfig(), root=root)
    assert problem and "escapes the dataset root" in problem and digest == ""


def test_a_board_template_linked_outside_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "pcb"
    _png(root / "g1" / "b_test.jpg", 1)
    _png(root / "g1" / "b2_test.jpg", 3)
    _png(root / "g1" / "b2_temp.jpg", 4)
    outside = _png(tmp_path / "elsewhere" / "golden.jpg", 2)
    _link(root / "g1" / "b_temp.jpg", outside)
    for name in ("b", "b2"):
        (root / "g1" / f"{name}.txt").write_text("1 1 4 4 1\n")
    (root / "list.txt").write_text("g1/b.jpg g1/b.txt\ng1/b2.jpg g1/b2.txt\n")
    samples = deeppcb_samples(root, "list.txt", SplitConfig(val=0.0, test=0.0), source="t")
    assert "template_sha256" not in samples[0] and "template_sha256" in samples[1]  # the link was never hashed
    snap = write_snapshot(tmp_path / "snap", samples, ["false_call", *DEFECT_TYPES], files_root=root)
    report = validate_snapshot(snap, ValidationConfig())
    assert [(q.path, q.reason) for q in report.quarantined] == [
        ("g1/b_test.jpg", f"path 'g1/b_temp.jpg' escapes the dataset root (symlink to {outside.resolve()})")]
    (root / "bad.txt").write_text("g1/b.jpg ../elsewhere/b.txt\n")
    with pytest.raises(ValueError, match="annotation '../elsewhere/b.txt' escapes the dataset root"):
        deeppcb_samples(root, "bad.txt", SplitConfig(), source="t")


def test_yolo_seg_image_linked_outside_is_listed_unopened(tmp_path: Path) -> None:
    root = tmp_path / "kolektor"
    _png(root / "images" / "train" / "a.png", 1)
    outside = _png(tmp_path / "elsewhere" / "b.png", 2)
    _link(root / "images" / "train" / "b.png", outside)
    for name in ("a", "b"):
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / f"{name}.txt").write_text("")
    samples = {s["path"]: s for s in yolo_seg_samples(root, test=0.0, seed=0)}
    assert "sha256" in samples["images/train/a.png"] and "sha256" not in samples["images/train/b.png"]
    snap = write_snapshot(tmp_path / "snap", list(samples.values()), ["good", "defect"], files_root=root)
    report = validate_snapshot(snap, ValidationConfig())
    assert [q.path for q in report.quarantined] == ["images/train/b.png"]
    assert "escapes the dataset root (symlink to" in report.quarantined[0].reason


# --- the bad-file budget --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("total", "counts", "fraction", "class_loss", "budget"), [
    (100, {"a": 50, "b": 50}, 0.01, 0.1, 1),        # 1 % of 100
    (99, {"a": 50, "b": 49}, 0.01, 0.1, 0),         # 0.99 rounds down
    (1000, {"a": 900, "b": 100}, 0.01, 0.1, 10),    # 1 % = 10 = 10 % of 100
    (1000, {"a": 950, "b": 50}, 0.01, 0.1, 5),      # the smallest class caps it
    (1000, {"a": 991, "b": 9}, 0.01, 0.1, 0),       # a class of 9 can lose none
    (1000, {"a": 1000, "empty": 0}, 0.01, 0.1, 10),  # a class without samples does not cap
    (300, {}, 0.01, 0.1, 3),                         # no known class: the fraction alone
    (100, {"a": 100}, 0.29, 1.0, 29),                # 0.29 * 100 is 28.999... in floating point
    (500, {"a": 250, "b": 250}, 0.0, 0.1, 0),        # max_bad_fraction=0: any bad file fails
    (0, {}, 0.01, 0.1, 0),
])
def test_bad_file_budget(total: int, counts: dict[str, int], fraction: float, class_loss: float,
                         budget: int) -> None:
    assert bad_file_budget(total, counts, fraction, class_loss) == budget


def test_bad_file_budget_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="must lie in"):
        bad_file_budget(10, {}, 1.5, 0.1)
    with pytest.raises(ValueError, match="negative"):
        bad_file_budget(10, {"a": -1}, 0.1, 0.1)


def test_defaults_are_one_percent_and_a_tenth_of_the_smallest_class() -> None:
    v = ValidationConfig()
    assert (v.max_bad_fraction, v.max_class_loss) == (0.01, 0.1)


class _Log(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_validate_data_warns_within_the_budget_and_fails_over_it(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "solder", 60)  # 120 samples, 60 a class: budget min(1, 6) = 1
    (root / "short" / "s7.png").write_bytes((root / "short" / "s7.png").read_bytes()[:40])  # truncated
    data = DataConfig(source=DataSource.folder, root=str(root), good_class="normal")
    data.shortcut.enabled = False
    log = _Log()
    ctx = StepContext("run", tmp_path / "run", tmp_path / "home", "x", log)
    pull_data(ctx, data)
    result = validate_data(ctx, data, TaskKind.classify, AnomalyConfig())
    assert (result.quarantined, result.accepted) == (1, 119)
    warning = next(line for line in log.lines if line.startswith("WARNING") and "quarantined" in line)
    assert "within the bad-file budget of 1" in warning and "short/s7.png:" in warning
    listed = json.loads(ctx.path(RUN.validation).read_text())
    assert listed["bad_file_budget"] == 1 and not listed["over_budget"]
    assert [q["path"] for q in listed["quarantined"]] == ["short/s7.png"]

    secret = _secret(tmp_path)
    _link(root / "normal" / "passwd.png", secret)  # a second bad file: over the budget
    ctx = StepContext("run2", tmp_path / "run2", tmp_path / "home", "x", _Log())
    pull_data(ctx, data)
    with pytest.raises(StepError) as err:
        validate_data(ctx, data, TaskKind.classify, AnomalyConfig())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("2 of 121 samples quarantined (label conflicts aside), over the bad-file budget of 1 "
                              "(min of data.validation.max_bad_fraction=0.01 of 121 samples and "
                              "data.validation.max_class_loss=0.1 of the smallest class 'short' (60 samples)); "
                              f"first: normal/passwd.png: path 'normal/passwd.png' escapes the dataset root "
                              f"(symlink to {secret.resolve()})")


def test_folder_import_reports_links_out(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", 3)
    secret = _secret(tmp_path)
    _link(root / "normal" / "passwd.png", secret)
    _link(root / "short" / "notes", secret.parent)
    found = import_folder(root, val=0.0, test=0.0, seed=0)
    assert set(found.escaped) == {"normal/passwd.png", "short/notes"}
    assert "short/notes" in found.ignored and "normal/passwd.png" not in found.ignored
    assert {s["path"]: "sha256" in s for s in found.samples}["normal/passwd.png"] is False
