"""``pull_data``: materialise the dataset snapshot the run trains on, from synthetic boards, a DeepPCB-format or
folder-per-class dataset read in place, or an existing snapshot (a folder or ``s3://``).

Reads: the configured source. Writes: ``RUN.snapshot`` (and ``RUN.boards`` for synthetic data, ``RUN.duplicates`` for a
folder import).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from defectops.core.fsutil import atomic_dir, write_json
from defectops.core.layout import RUN
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import PullDataResult
from defectops.pipelines.tasks.verify import task_classes
from defectops.training.config import DataConfig
from defectops.training.snapshot import (
    SPLITS,
    Snapshot,
    check_split_config,
    deeppcb_samples,
    load_snapshot,
    sample_group,
    write_snapshot,
)

if TYPE_CHECKING:
    from defectops.training.importers import Duplicates

READS: tuple[str, ...] = ()
WRITES = (RUN.snapshot, RUN.boards, RUN.duplicates)


def pull_data(ctx: StepContext, data: DataConfig) -> PullDataResult:
    """Materialise the dataset snapshot: synthetic boards, a DeepPCB-format or folder-per-class dataset read in
    place, or a snapshot (local folder or ``s3://``, cached by fingerprint). The result's ``groups`` counts the
    samples of each group (:func:`sample_group`: a board design) per split.

    A folder dataset's duplicate handling (copies dropped, groups, label conflicts; see
    :func:`training.importers.import_folder`) is counted in the result's ``duplicates`` and listed in full in
    ``data/duplicates.json``."""
    source = data.source
    duplicates = None
    try:
        check_split_config(data.split)
    except ValueError as e:
        raise StepError(str(e)) from None
    if source == "synth":
        samples, classes, files_root = _synth_samples(ctx, data)
    elif source in ("deeppcb", "folder", "yolo_seg"):
        root = _data_root(data)
        samples, classes, files_root, duplicates = import_source(source, root, data)
    elif source == "snapshot":
        if not data.root:
            raise StepError("data.root is not set: pass data.root=<snapshot folder or s3://bucket/prefix[@fingerprint]>")
        snap = fetch_snapshot(data.root, ctx.home)
        samples, classes, files_root = list(snap.samples), list(snap.classes), snap.files_root
        if data.split.group_by != "none":
            ctx.reporter.log(f"data.split.group_by={data.split.group_by} is not applied to a snapshot: its manifest "
                             "carries the splits")
    else:
        raise StepError(f"unknown data.source {source!r}: use synth, deeppcb, folder, yolo_seg or snapshot")
    if data.good_class not in classes:
        raise StepError(f"data.good_class={data.good_class} is not a class of this dataset (classes: "
                        f"{', '.join(classes)}): set data.good_class=<the non-defect class>")
    groups = {sp: dict(sorted(Counter(sample_group(x) for x in samples if x["split"] == sp).items())) for sp in SPLITS}
    if data.split.group_by != "none" and source != "snapshot":
        if not groups["test"]:
            raise StepError(f"data.split.group_by={data.split.group_by} left no group for the test split (groups: "
                            f"{', '.join(groups['train'])}): pin one with data.split.test_groups=[NAME] or raise "
                            "data.split.test")
        for sp in ("val", "test"):
            ctx.reporter.log(f"{sp} groups ({data.split.group_by}): "
                             + (", ".join(f"{g} ({n})" for g, n in groups[sp].items()) or "none"))
    snap = write_snapshot(ctx.path(RUN.snapshot), samples, classes, files_root=files_root)
    counts = {sp: sum(1 for x in samples if x["split"] == sp) for sp in SPLITS}
    if duplicates is not None:
        write_json(ctx.path(RUN.duplicates), duplicates.to_dict())
        ctx.reporter.log(f"{duplicates.summary()}; list in {ctx.path(RUN.duplicates)}")
    return PullDataResult(snap.fingerprint, len(samples), counts, str(files_root), list(classes), groups,
                          duplicates.counts() if duplicates is not None else None)


def _data_root(data: DataConfig) -> Path:
    if not data.root:
        raise StepError(f"data.root is not set: pass data.root=<a {data.source} dataset folder>")
    root = Path(data.root).expanduser().resolve()
    if not root.is_dir():
        raise StepError(f"data.root {root} does not exist: pass data.root=<a {data.source} dataset folder>")
    return root


def _synth_samples(ctx: StepContext, data: DataConfig) -> tuple[list[dict[str, Any]], list[str], Path]:
    from defectops.training.synth import write_deeppcb_root

    s = data.synth
    if data.split.group_by == "design":
        raise StepError("data.split.group_by=design needs board designs, but every synthetic board draws its own "
                        "layout (its folder, group90000, is a batch of 1,000 boards): use data.split.group_by=none, "
                        "which already keeps each synthetic design in one split")
    boards = ctx.path(RUN.boards)
    if not (boards / "trainval.txt").is_file():
        advance = ctx.reporter.task("generating synthetic boards", s.n_boards)
        with atomic_dir(boards) as tmp:
            write_deeppcb_root(tmp, s.n_boards, s.seed, size=s.size, defects=(s.defects[0], s.defects[1]),
                               defect_rate=s.defect_rate, nuisance=(s.nuisance[0], s.nuisance[1]),
                               progress=lambda _done: advance(1))
    samples, classes, root, _ = import_source("deeppcb", boards, data, list_file="trainval.txt")
    for x in samples:
        x["source"] = f"synth:seed={s.seed}"
    return samples, classes, root


class Imported(NamedTuple):
    samples: list[dict[str, Any]]
    classes: list[str]
    files_root: Path
    duplicates: Duplicates | None  # what a folder import did with repeated content; None for other kinds


def import_source(kind: str, root: Path, data: DataConfig, *, list_file: str | None = None) -> Imported:
    """Manifest samples, classes, files root (and, for ``folder``, the duplicate report) for a dataset read in place
    (``deeppcb`` or ``folder``)."""
    from defectops.training.importers import import_folder

    split = data.split
    try:
        if kind == "deeppcb":
            samples = deeppcb_samples(root, list_file or data.list_file, split, source=f"deeppcb:{root.name}")
            return Imported(samples, task_classes(data), root, None)
        if kind == "folder":
            if split.group_by != "none":
                raise StepError(f"data.split.group_by={split.group_by} keeps board designs together, but a "
                                "folder-per-class dataset has none (its folders are classes): use "
                                "data.split.group_by=none")
            found = import_folder(root, val=split.val, test=split.test, seed=split.seed,
                                  good_class=data.good_class if data.good_class else None, dedup=data.dedup)
            return Imported(found.samples, found.classes, root, found.duplicates)
        if kind == "yolo_seg":
            from defectops.training.yolo_seg import CLASSES, yolo_seg_samples

            if data.good_class != CLASSES[0]:
                raise StepError(f"a YOLO segmentation dataset has the classes {', '.join(CLASSES)}: set "
                                f"data.good_class={CLASSES[0]}")
            return Imported(yolo_seg_samples(root, test=split.test, seed=split.seed), list(CLASSES), root, None)
    except (FileNotFoundError, ValueError) as e:
        raise StepError(str(e)) from None
    raise StepError(f"unknown dataset kind {kind!r}: use deeppcb, folder or yolo_seg")


def fetch_snapshot(ref: str, home: Path) -> Snapshot:
    """A complete snapshot from a local folder, or pulled from ``s3://`` into ``<home>/cache/snapshots/<fp>``
    (``s3://bucket/prefix`` means its ``latest`` snapshot; ``...@<fingerprint>`` pins one, served from the cache
    without any request once pulled)."""
    if ref.startswith("s3://"):
        from defectops.training.remote import RemoteError, pull_snapshot, remote_fingerprint

        cache = home / "cache" / "snapshots"
        try:
            fp = ref.rsplit("@", 1)[1] if "@" in ref else remote_fingerprint(ref)
            if fp is None:
                raise StepError(f"no complete snapshot at {ref}: push one with `defectops data push`")
            base = ref.rsplit("@", 1)[0]
            return pull_snapshot(f"{base}@{fp}", cache / fp)
        except (RemoteError, ValueError, FileExistsError) as e:
            raise StepError(str(e)) from None
    try:
        return load_snapshot(Path(ref).expanduser())
    except (FileNotFoundError, ValueError) as e:
        raise StepError(str(e)) from None
