"""Grouped splits: whole board designs go to one split (``data.split.group_by=design``), pinned designs are honoured,
fractions of samples are roughly met, the assignment is deterministic, and ``group_by=none`` keeps today's splits."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from defectops.pipelines.context import Reporter, StepContext, StepError
from defectops.pipelines.steps.pull_data import pull_data
from defectops.training.config import DataConfig, SplitConfig
from defectops.training.snapshot import (
    SPLITS,
    assign_group_splits,
    assign_split,
    assign_splits,
    check_split_config,
    deeppcb_samples,
    load_snapshot,
    sample_group,
)

DESIGNS = {"group00041": 7, "group12000": 5, "group13000": 9, "group20085": 4, "group44000": 6, "group77000": 3}


def _deeppcb_folder(root: Path, designs: dict[str, int]) -> Path:
    """A tiny DeepPCB-format folder: ``n`` pairs per design, one box each; the images are placeholder bytes."""
    lines = []
    for design, n in designs.items():
        g = design.removeprefix("group")
        for i in range(n):
            stem = f"{g}{i:03d}"
            for suffix in ("_test.jpg", "_temp.jpg"):
                p = root / design / g / f"{stem}{suffix}"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(f"{design}/{stem}{suffix}".encode())
            ann = root / design / f"{g}_not" / f"{stem}.txt"
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text("10 10 30 30 1\n")
            lines.append(f"{design}/{g}/{stem}.jpg {design}/{g}_not/{stem}.txt")
    (root / "trainval.txt").write_text("\n".join(lines))
    return root


class _Log(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _ctx(tmp_path: Path) -> StepContext:
    return StepContext(run_id="t", root=tmp_path / "run", home=tmp_path / "home", config_hash="h", reporter=_Log())


# ------------------------------------------------------------------------------------------ assign_group_splits
def test_property_whole_groups_pins_and_minimums() -> None:
    rng = random.Random(0)
    for case in range(400):
        n = rng.randint(1, 25)
        sizes = {f"g{rng.randrange(10**6)}-{i}": rng.randint(1, 120) for i in range(n)}
        val, test = rng.choice([0.0, 0.1, 0.15, 0.3]), rng.choice([0.0, 0.05, 0.2, 0.4])
        names = sorted(sizes)
        rng.shuffle(names)
        k = rng.randint(0, min(2, n - 1))
        pin_val, pin_test = names[:k][: k // 2], names[:k][k // 2:]
        seed = rng.randrange(1000)
        of = assign_group_splits(sizes, val, test, seed, pin_val, pin_test)
        assert set(of) == set(sizes) and set(of.values()) <= set(SPLITS), case
        assert all(of[g] == "val" for g in pin_val) and all(of[g] == "test" for g in pin_test), case
        n_groups = Counter(of.values())
        assert n_groups["train"] >= 1, case
        if n - k >= 3:
            assert n_groups["test"] >= (test > 0) and n_groups["val"] >= (val > 0), (case, of)
        # expanded to samples: every sample has its group's split, and no group spans two splits
        samples = [{"path": f"{g}/x/{j}_test.jpg"} for g, size in sizes.items() for j in range(size)]
        rng.shuffle(samples)
        assign_splits(samples, SplitConfig(val=val, test=test, seed=seed, group_by="design", val_groups=pin_val,
                                           test_groups=pin_test))
        spans: dict[str, set[str]] = {}
        for s in samples:
            spans.setdefault(sample_group(s), set()).add(s["split"])
        assert all(spans[g] == {of[g]} for g in sizes), case


def test_fractions_of_samples_roughly_met() -> None:
    rng = random.Random(1)
    for seed in range(30):
        sizes = {f"design{i}": rng.randint(5, 40) for i in range(60)}
        total = sum(sizes.values())
        of = assign_group_splits(sizes, 0.15, 0.2, seed)
        share = {sp: sum(n for g, n in sizes.items() if of[g] == sp) / total for sp in SPLITS}
        slack = max(sizes.values()) / total  # one group more or less
        assert abs(share["test"] - 0.2) <= slack and abs(share["val"] - 0.15) <= slack, share


def test_fractions_are_of_samples_not_groups() -> None:
    # one huge group and many small ones: 20 % of the samples is a few small groups, not 20 % of the groups
    sizes = {"big": 800, **{f"small{i}": 10 for i in range(20)}}
    of = assign_group_splits(sizes, 0.0, 0.2, 0)
    test = [g for g, sp in of.items() if sp == "test"]
    assert of["big"] == "train" and sum(sizes[g] for g in test) == pytest.approx(200, abs=10)


def test_deterministic_and_independent_of_dict_order() -> None:
    sizes = {f"group{i:05d}": (i * 37) % 90 + 10 for i in range(12)}
    first = assign_group_splits(sizes, 0.15, 0.2, 7)
    items = list(sizes.items())
    for k in range(5):
        random.Random(k).shuffle(items)
        assert assign_group_splits(dict(items), 0.15, 0.2, 7) == first
    assert list(first) == sorted(sizes)
    others = {tuple(sorted(assign_group_splits(sizes, 0.15, 0.2, s).items())) for s in range(10)}
    assert len(others) > 1  # the seed matters


def test_leave_design_out_pins_the_test_design() -> None:
    of = assign_group_splits(DESIGNS, 0.15, 0.0, 0, test_groups=["group44000"])
    assert [g for g, sp in of.items() if sp == "test"] == ["group44000"]
    assert "val" in of.values() and of["group44000"] == "test"
    pinned = assign_group_splits(DESIGNS, 0.0, 0.0, 0, val_groups=["group77000"], test_groups=["group12000"])
    assert pinned == {g: {"group77000": "val", "group12000": "test"}.get(g, "train") for g in DESIGNS}


def test_a_small_fraction_still_gets_a_group() -> None:
    # 5 % of 400 samples is 20, nearer to no group than to any 100-sample group: the minimum rule gives one anyway
    of = assign_group_splits(dict.fromkeys("abcd", 100), 0.05, 0.05, 0)
    assert Counter(of.values()) == {"train": 2, "val": 1, "test": 1}
    assert Counter(assign_group_splits(dict.fromkeys("abcd", 100), 0.0, 0.05, 0).values()) == {"train": 3, "test": 1}


def test_few_groups_train_keeps_one() -> None:
    assert assign_group_splits({"only": 10}, 0.15, 0.2, 0) == {"only": "train"}
    two = assign_group_splits({"a": 10, "b": 10}, 0.49, 0.49, 0)
    assert "train" in two.values()
    assert assign_group_splits({}, 0.1, 0.1, 0) == {}


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"test_groups": ["group99999"]}, ["test_groups", "group99999", "group00041", "use those names"]),
    ({"val_groups": ["nope"]}, ["val_groups", "nope"]),
    ({"val_groups": ["group12000"], "test_groups": ["group12000"]}, ["group12000", "both", "one split"]),
    ({"val_groups": ["group00041", "group12000", "group13000"],
      "test_groups": ["group20085", "group44000", "group77000"]}, ["every group", "training"]),
    ({"val": 0.6, "test": 0.5}, ["val=0.6", "test=0.5"]),
])
def test_errors_name_the_groups_and_the_fix(kwargs: dict, words: list[str]) -> None:
    args = {"val": 0.15, "test": 0.2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(words[0])) as e:
        assign_group_splits(DESIGNS, args.pop("val"), args.pop("test"), 0, **args)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_check_split_config() -> None:
    check_split_config(SplitConfig())
    check_split_config(SplitConfig(group_by="design", test_groups=["g"]))
    with pytest.raises(ValueError, match="group_by='board'.*none or design"):
        check_split_config(SplitConfig(group_by="board"))
    with pytest.raises(ValueError, match="group_by=design"):
        check_split_config(SplitConfig(test_groups=["group44000"]))


# --------------------------------------------------------------------------------------------- deeppcb_samples
def test_deeppcb_design_split_keeps_each_design_in_one_split(tmp_path: Path) -> None:
    root = _deeppcb_folder(tmp_path, DESIGNS)
    for seed in range(5):
        samples = deeppcb_samples(root, "trainval.txt", SplitConfig(val=0.15, test=0.2, seed=seed, group_by="design"),
                                  source="t")
        by_design: dict[str, set[str]] = {}
        for s in samples:
            by_design.setdefault(s["path"].split("/")[0], set()).add(s["split"])
        assert set(by_design) == set(DESIGNS) and all(len(v) == 1 for v in by_design.values())
        assert {sp for v in by_design.values() for sp in v} == set(SPLITS)
        assert "group" not in samples[0]  # the design is the path's first folder: no extra manifest key


def test_deeppcb_none_gives_the_old_per_pair_splits(tmp_path: Path) -> None:
    root = _deeppcb_folder(tmp_path, DESIGNS)
    samples = deeppcb_samples(root, "trainval.txt", SplitConfig(val=0.2, test=0.3, seed=4), source="t")
    assert {k for s in samples for k in s} == {"path", "template", "annotation", "label", "boxes", "source", "split",
                                               "sha256", "template_sha256"}
    for s in samples:
        stem = Path(s["path"]).name.removesuffix("_test.jpg")
        assert s["split"] == assign_split(stem, 0.2, 0.3, 4)
    spans = Counter(len({s["split"] for s in samples if s["path"].startswith(d)}) for d in DESIGNS)
    assert max(spans) > 1  # per pair: designs do span splits


def test_deeppcb_rejects_bad_split_config(tmp_path: Path) -> None:
    root = _deeppcb_folder(tmp_path, DESIGNS)
    with pytest.raises(ValueError, match="unknown"):
        deeppcb_samples(root, "trainval.txt", SplitConfig(group_by="designs"), source="t")
    with pytest.raises(ValueError, match="group99"):
        deeppcb_samples(root, "trainval.txt", SplitConfig(group_by="design", test_groups=["group99"]), source="t")


def test_real_deeppcb_design_split(deeppcb_root: Path) -> None:
    split = SplitConfig(val=0.15, test=0.0, group_by="design", test_groups=["group44000"])
    samples = deeppcb_samples(deeppcb_root, "trainval.txt", split, source="t", hash_files=False)
    splits = {(sample_group(s), s["split"]) for s in samples}
    assert len({g for g, _ in splits}) == len(splits)  # no design in two splits
    assert {g for g, sp in splits if sp == "test"} == {"group44000"} and any(sp == "val" for _, sp in splits)


# ---------------------------------------------------------------------------------------------------- pull_data
def test_pull_data_reports_groups_per_split(tmp_path: Path) -> None:
    root = _deeppcb_folder(tmp_path / "ds", DESIGNS)
    data = DataConfig(source="deeppcb", root=str(root),
                      split=SplitConfig(val=0.15, test=0.0, group_by="design", test_groups=["group44000"]))
    ctx = _ctx(tmp_path)
    result = pull_data(ctx, data)
    groups = result.groups
    assert groups["test"] == {"group44000": DESIGNS["group44000"]}
    assert {g: n for sp in SPLITS for g, n in groups[sp].items()} == DESIGNS
    assert {sp: sum(groups[sp].values()) for sp in SPLITS} == result.splits
    assert sum(len(groups[sp]) for sp in SPLITS) == len(DESIGNS)  # each design in exactly one split
    log = ctx.reporter.lines  # type: ignore[attr-defined]
    assert any(line.startswith("test groups") and "group44000 (6)" in line for line in log), log
    assert any(line.startswith("val groups") and all(g in line for g in groups["val"]) for line in log), log
    snap = load_snapshot(ctx.path("data/snapshot"))
    assert {sample_group(s): s["split"] for s in snap.samples}["group44000"] == "test"


def test_pull_data_group_by_none_is_quiet_and_unchanged(tmp_path: Path) -> None:
    root = _deeppcb_folder(tmp_path / "ds", DESIGNS)
    ctx = _ctx(tmp_path)
    result = pull_data(ctx, DataConfig(source="deeppcb", root=str(root)))
    assert set(result.groups) == set(SPLITS) and ctx.reporter.lines == []  # type: ignore[attr-defined]
    direct = deeppcb_samples(root, "trainval.txt", SplitConfig(), source=f"deeppcb:{root.name}")
    assert result.splits == {sp: sum(s["split"] == sp for s in direct) for sp in SPLITS}


@pytest.mark.parametrize(("data", "words"), [
    (DataConfig(split=SplitConfig(group_by="board")), ["group_by='board'", "none or design"]),
    (DataConfig(split=SplitConfig(group_by="design")), ["synthetic", "group_by=none"]),
    (DataConfig(split=SplitConfig(test_groups=["group44000"])), ["group44000", "group_by=design"]),
    (DataConfig(source="folder", split=SplitConfig(group_by="design")), ["folder-per-class", "group_by=none"]),
    (DataConfig(source="deeppcb", split=SplitConfig(group_by="design", test_groups=["group1"])),
     ["group1", "test_groups"]),
    (DataConfig(source="deeppcb", split=SplitConfig(group_by="design", val_groups=["group44000"], test=0.0)),
     ["no group for the test split", "test_groups"]),
])
def test_pull_data_errors(tmp_path: Path, data: DataConfig, words: list[str]) -> None:
    root = _deeppcb_folder(tmp_path / "ds", DESIGNS)
    (root / "cls").mkdir()
    if data.source in ("deeppcb", "folder"):
        data.root = str(root)
    with pytest.raises(StepError) as e:
        pull_data(_ctx(tmp_path), data)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


# --------------------------------------------------------------------------------------------- config and CLI
def test_hydra_overrides_reach_split_config() -> None:
    from defectops.pipelines.config import load_config

    cfg = load_config(["+experiment=deeppcb", "data.root=/data/PCBData", "data.split.group_by=design",
                       "data.split.test_groups=[group44000]", "data.split.test=0.0"])
    assert cfg.data.split == SplitConfig(val=0.15, test=0.0, seed=0, group_by="design", val_groups=[],
                                         test_groups=["group44000"])
    assert load_config([]).data.split.group_by == "none"


def test_cli_import_deeppcb_by_design(tmp_path: Path) -> None:
    from defectops.pipelines.cli import app

    root = _deeppcb_folder(tmp_path / "ds", DESIGNS)
    r = CliRunner().invoke(app, ["data", "import", "deeppcb", str(root), "--out", str(tmp_path / "snap"),
                                 "--group-by", "design", "--test-group", "group13000", "--test", "0"])
    assert r.exit_code == 0, r.output
    snap = load_snapshot(tmp_path / "snap")
    assert {sample_group(s) for s in snap.samples if s["split"] == "test"} == {"group13000"}
    bad = CliRunner().invoke(app, ["data", "import", "deeppcb", str(root), "--out", str(tmp_path / "x"),
                                   "--test-group", "group13000"])
    assert bad.exit_code != 0 and "group_by=design" in bad.output
