"""``defectops data``: import datasets into snapshots, validate them, and move them to and from S3."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_USAGE, console, fail, progress_bars
from defectops.training.config import GroupBy, SplitConfig, ValidationConfig

data_app = typer.Typer(help="Dataset snapshots: import, validate, push to and pull from S3.", no_args_is_help=True)
import_app = typer.Typer(help="Import a dataset into a snapshot (manifest.jsonl + classes.json + fingerprint).",
                         no_args_is_help=True)
data_app.add_typer(import_app, name="import")

Out = Annotated[Path, typer.Option("--out", help="Snapshot folder to write (manifest.jsonl, classes.json, "
                                                 "snapshot.json).")]
Val = Annotated[float, typer.Option(help="Fraction of samples for the validation split (by a hash of the name).")]
Test = Annotated[float, typer.Option(help="Fraction of samples for the test split (by a hash of the name).")]
Seed = Annotated[int, typer.Option(help="Seed of the split assignment.")]


def _report(snapshot_dir: Path) -> None:
    from defectops.training.snapshot import load_snapshot

    snap = load_snapshot(snapshot_dir)
    t = Table(title=f"snapshot {snapshot_dir}", title_justify="left")
    for col in ("split", *snap.classes):
        t.add_column(col, justify="left" if col == "split" else "right")
    for split in ("train", "val", "test"):
        rows = [s for s in snap.samples if s["split"] == split]
        if any("boxes" in s for s in rows):
            counts = [sum(1 for s in rows for b in s.get("boxes", []) if b[4] == c) for c in snap.classes]
        else:
            counts = [sum(1 for s in rows if s["label"] == c) for c in snap.classes]
        t.add_row(f"{split} ({len(rows)})", *[str(n) for n in counts])
    console.print(t)
    console.print(f"fingerprint {snap.fingerprint}")


def _write(out: Path, samples: list[dict[str, Any]], classes: list[str], files_root: Path) -> None:
    from defectops.training.snapshot import write_snapshot

    write_snapshot(out, samples, classes, files_root=files_root)
    _report(out)


@import_app.command("deeppcb")
def import_deeppcb(
    root: Annotated[Path, typer.Argument(help="DeepPCB-format folder (e.g. DeepPCB/PCBData) with the list file.")],
    out: Out,
    list_file: Annotated[str, typer.Option("--list", help="List file inside ROOT (DeepPCB's trainval.txt format).")]
    = "trainval.txt",
    val: Val = 0.15, test: Test = 0.2, seed: Seed = 0,
    group_by: Annotated[GroupBy, typer.Option(help="none: split pair by pair; design: whole board designs (the "
                                                   "list's first folder, groupNNNNN) go to one split.")] = GroupBy.none,
    val_group: Annotated[list[str] | None, typer.Option(help="Design pinned to val (repeatable; --group-by design).")]
    = None,
    test_group: Annotated[list[str] | None, typer.Option(help="Design pinned to test (repeatable; --group-by "
                                                              "design).")] = None,
) -> None:
    """Index DeepPCB-format board pairs in place (files are not copied): boxes and defect types per pair."""
    from defectops.core.taxonomy import DEFECT_TYPES
    from defectops.training.snapshot import deeppcb_samples

    split = SplitConfig(val=val, test=test, seed=seed, group_by=group_by, val_groups=list(val_group or []),
                        test_groups=list(test_group or []))
    try:
        samples = deeppcb_samples(root.resolve(), list_file, split, source=f"deeppcb:{root.resolve().name}")
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    _write(out, samples, ["false_call", *DEFECT_TYPES], root.resolve())


@import_app.command("folder")
def import_folder_cmd(
    root: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class (optionally under train/, val/, "
                                              "test/).")],
    out: Out,
    good_class: Annotated[str | None, typer.Option(help="The non-defect class (listed first).")] = None,
    val: Val = 0.15, test: Test = 0.2, seed: Seed = 0,
    near: Annotated[bool, typer.Option("--near/--no-near", help="Also group near-identical images (perceptual "
                                                                "hash) so that each group stays in one split.")]
    = False,
    max_distance: Annotated[int, typer.Option(help="Near-duplicates: most differing bits of 64 (with --near).")] = 4,
) -> None:
    """Index a folder-per-class image dataset in place: any file names, PNG/JPEG/TIFF/BMP, any sizes. Identical files
    share a split, copies within a class are kept once, the same content under two labels is reported (validation
    quarantines it); OUT/duplicates.json lists them all."""
    from defectops.core.fsutil import write_json
    from defectops.training.config import DedupConfig
    from defectops.training.importers import import_folder

    try:
        found = import_folder(root.resolve(), val=val, test=test, seed=seed, good_class=good_class,
                              dedup=DedupConfig(near=near, max_distance=max_distance))
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    if found.ignored:
        console.print(f"[yellow]ignored {len(found.ignored)} files[/] (hidden, not images, or outside class folders): "
                      + ", ".join(found.ignored[:5]) + (" ..." if len(found.ignored) > 5 else ""), highlight=False)
    if found.escaped:
        console.print(f"[yellow]{len(found.escaped)} symlinks lead outside {root}[/] and are never opened (image "
                      "names stay in the manifest for validation to quarantine): "
                      + "; ".join(f"{p}: {r}" for p, r in list(found.escaped.items())[:5])
                      + (" ..." if len(found.escaped) > 5 else ""), highlight=False)
    _write(out, found.samples, found.classes, root.resolve())
    write_json(out / "duplicates.json", found.duplicates.to_dict())
    console.print(f"{found.duplicates.summary()}; list in {out / 'duplicates.json'}", highlight=False)


@import_app.command("line")
def import_line(
    store: Annotated[Path, typer.Argument(help="A `defectops line serve --store` folder (results and verdicts).")],
    out: Out,
    val: Val = 0.15, test: Test = 0.2, seed: Seed = 0,
) -> None:
    """Turn the boards a repair station verified at the line into a dataset snapshot, read in place from the store:
    confirmed and missed defects as labels, false fails as good; lineage (models, versions, lines, operators) in
    OUT/snapshot.json. The next `defectops run data=snapshot data.root=OUT` trains on it."""
    from defectops.serving.line.dataset import line_samples
    from defectops.training.snapshot import write_snapshot

    try:
        samples, classes, lineage = line_samples(store.resolve(), SplitConfig(val=val, test=test, seed=seed))
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    write_snapshot(out, samples, classes, files_root=store.resolve(), extra={"lineage": lineage})
    _report(out)
    if lineage["skipped"]:
        console.print("left out: " + ", ".join(f"{n} ({why})" for why, n in lineage["skipped"].items()),
                      highlight=False)
    console.print(f"{lineage['boards']} verified boards from {', '.join(lineage['models'])} on "
                  f"{', '.join(lineage['lines'])}", highlight=False)


@import_app.command("synth")
def import_synth(
    out: Out,
    boards: Annotated[int, typer.Option(help="Number of synthetic board pairs.")] = 200,
    size: Annotated[int, typer.Option(help="Board side in pixels.")] = 640,
    seed: Seed = 0, val: Val = 0.15, test: Test = 0.2,
) -> None:
    """Generate seeded synthetic boards (DeepPCB format) into OUT/boards and snapshot them (self-contained)."""
    from defectops.core.taxonomy import DEFECT_TYPES
    from defectops.training.snapshot import deeppcb_samples
    from defectops.training.synth import write_deeppcb_root

    with progress_bars() as progress:
        tid = progress.add_task("generating boards", total=boards)
        write_deeppcb_root(out / "boards", boards, seed, size=size, progress=lambda _: progress.advance(tid, 1))
    samples = deeppcb_samples(out / "boards", "trainval.txt", SplitConfig(val=val, test=test, seed=seed),
                              source=f"synth:seed={seed}")
    for s in samples:
        for key in ("path", "template"):
            s[key] = f"boards/{s[key]}"
    _write(out, samples, ["false_call", *DEFECT_TYPES], out)


@data_app.command("validate")
def validate(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot folder.")],
    max_bad_fraction: Annotated[float, typer.Option(help="Bad-file budget: at most this fraction of the samples may "
                                                         "be quarantined (label conflicts not counted) ...")]
    = ValidationConfig.max_bad_fraction,
    max_class_loss: Annotated[float, typer.Option(help="... and never more than this fraction of the smallest "
                                                       "class; exit 1 over the budget (0 and 0: any bad file).")]
    = ValidationConfig.max_class_loss,
    max_conflict_fraction: Annotated[float, typer.Option(help="Exit 1 when more than this fraction is quarantined "
                                                              "as label conflicts (same content, two labels).")]
    = ValidationConfig.max_conflict_fraction,
) -> None:
    """Check every sample (corrupt, truncated, oversized, duplicates/leakage, label conflicts, unknown labels,
    paths or symlinks escaping the dataset root) and list the quarantined ones with the reason. Exit 1 over the
    bad-file budget (min of --max-bad-fraction of the samples and --max-class-loss of the smallest class) or
    --max-conflict-fraction."""
    from defectops.training.snapshot import load_snapshot
    from defectops.training.validation import validate_snapshot

    try:
        snap = load_snapshot(snapshot)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    with progress_bars() as progress:
        tid = progress.add_task("validating", total=len(snap.samples))
        report = validate_snapshot(snap, ValidationConfig(max_bad_fraction=max_bad_fraction,
                                                          max_class_loss=max_class_loss),
                                   progress=lambda n: progress.advance(tid, n))
    if report.quarantined:
        t = Table("sample", "reason")
        for q in report.quarantined:
            t.add_row(q.path, q.reason)
        console.print(t)
    console.print(report.summary(), highlight=False)
    if report.over_budget:
        raise fail(report.budget_message().replace("data.validation.max_bad_fraction", "--max-bad-fraction")
                   .replace("data.validation.max_class_loss", "--max-class-loss"), EXIT_FAILURE)
    if report.bad:
        console.print(f"[yellow]WARNING[/] {report.budget_message(first_reason=False)}", highlight=False)
    if report.conflict_fraction > max_conflict_fraction:
        raise fail(f"{report.conflict_fraction:.1%} of samples are label conflicts (same content under two labels), "
                   f"over --max-conflict-fraction {max_conflict_fraction}: fix the class folders", EXIT_FAILURE)


@data_app.command("push")
def push(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot folder to upload.")],
    uri: Annotated[str, typer.Argument(help="Destination s3://bucket/prefix (objects are content-addressed).")],
    workers: Annotated[int, typer.Option(help="Parallel uploads.")] = 8,
) -> None:
    """Upload a snapshot: files by content hash (skipping those already there), then its manifest; the snapshot
    becomes visible as complete only at the end. Rerun to resume an interrupted push. Endpoint: $AWS_ENDPOINT_URL."""
    from defectops.training.remote import RemoteError, push_snapshot
    from defectops.training.snapshot import load_snapshot

    try:
        total = len(load_snapshot(snapshot).samples)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    with progress_bars() as progress:
        tid = progress.add_task("uploading (bytes)", total=None)
        try:
            r = push_snapshot(snapshot, uri, workers=workers, progress=lambda n: progress.advance(tid, n))
        except (RemoteError, ValueError, FileNotFoundError) as e:
            raise fail(str(e), EXIT_FAILURE) from None
    console.print(f"pushed {r.uri} ({total} samples): {r.uploaded} objects uploaded, {r.skipped} already there, "
                  f"{r.bytes} bytes; fingerprint {r.fingerprint}")


@data_app.command("pull")
def pull(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix (latest) or s3://bucket/prefix@<fingerprint>.")],
    dest: Annotated[Path, typer.Argument(help="Local folder for the snapshot (created atomically).")],
    workers: Annotated[int, typer.Option(help="Parallel downloads.")] = 8,
) -> None:
    """Download a snapshot, verifying every file's sha256 and the fingerprint; resumable; nothing appears at DEST
    unless complete and verified."""
    from defectops.training.remote import RemoteError, pull_snapshot

    with progress_bars() as progress:
        tid = progress.add_task("downloading (bytes)", total=None)
        try:
            snap = pull_snapshot(uri, dest, workers=workers, progress=lambda n: progress.advance(tid, n))
        except (RemoteError, ValueError, FileExistsError) as e:
            raise fail(str(e), EXIT_FAILURE) from None
    console.print(f"pulled {len(snap.samples)} samples into {dest}; fingerprint {snap.fingerprint}")


def register(app: typer.Typer) -> None:
    """``defectops data ...``."""
    app.add_typer(data_app, name="data")
