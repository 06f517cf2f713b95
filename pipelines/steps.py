"""The DAG's steps: plain typed functions from a run root (and the sub-configs they name) to a JSON-able result.

Every input and output is a file under the run root, so a step behaves the same in-process (local runner) and in a
pod (``defectops step <name> --run-root ...``). The runner passes each parameter named after a config group
(``data``, ``model``, ``train``, ``gates``, ``registry``, ``export``, ``detect``, ``seed``) from the resolved
configuration.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from defectops.core.fsutil import atomic_dir, atomic_path, read_json, write_json
from defectops.core.taxonomy import DEFECT_TYPES
from defectops.evaluation.gates import GateConfig, GateReport, evaluate_gates
from defectops.evaluation.intervals import (
    DEFAULT_RESAMPLES,
    ClassificationIntervals,
    board_breakdown,
    bootstrap_macro_recall,
    classification_intervals,
)
from defectops.evaluation.metrics import ClassificationMetrics, classification_metrics, pr_curves
from defectops.evaluation.report import Miss, render_report, write_miss_tiles
from defectops.evaluation.shortcut import DEFAULT_FIX, ShortcutReport, shortcut_check
from defectops.pipelines.config import artifact_location, tracking_uri
from defectops.pipelines.context import GateFailure, StepContext, StepError
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.training.config import DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import (
    SPLITS,
    Snapshot,
    check_split_config,
    deeppcb_samples,
    load_snapshot,
    sample_group,
    write_snapshot,
)
from defectops.training.trainer import resolve_device

if TYPE_CHECKING:
    from defectops.training.importers import Duplicates

SNAPSHOT = "data/snapshot"
BOARDS = "data/boards"
VALIDATION = "data/validation.json"
DUPLICATES = "data/duplicates.json"
CROPS = "data/crops"
SHORTCUT = "data/shortcut.json"
CHECKPOINTS = "train/checkpoints"
MODEL = "train/model.pt"
MLFLOW_RUN = "train/mlflow_run.json"
PREDICTIONS = "eval/predictions.npz"
CHAMPION_METRICS = "eval/champion_metrics.json"
BOARD_METRICS = "board_metrics.json"
DETECTOR = "eval/detector.json"
ONNX_BOARD_METRICS = "export/board_metrics.json"
METRICS = "metrics.json"
GATES = "gates.json"
REPORT = "report.html"
MISSES = "eval/misses"
REGISTRATION = "registry.json"
ONNX = "export/model.onnx"
ONNX_INT8 = "export/model.int8.onnx"
INT8_REPORT = "export/int8.json"
PARITY = "export/parity.json"
ONNX_METRICS = "export/metrics.json"
ONNX_GATES = "export/gates.json"
TRITON = "triton"


def task_classes(data: DataConfig) -> list[str]:
    return [data.good_class, *DEFECT_TYPES]


# --------------------------------------------------------------------------------------------------- pull_data
def pull_data(ctx: StepContext, data: DataConfig) -> dict[str, Any]:
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
    elif source in ("deeppcb", "folder"):
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
        raise StepError(f"unknown data.source {source!r}: use synth, deeppcb, folder or snapshot")
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
    snap = write_snapshot(ctx.path(SNAPSHOT), samples, classes, files_root=files_root)
    counts = {sp: sum(1 for x in samples if x["split"] == sp) for sp in SPLITS}
    result = {"fingerprint": snap.fingerprint, "samples": len(samples), "splits": counts,
              "files_root": str(files_root), "classes": classes, "groups": groups}
    if duplicates is not None:
        write_json(ctx.path(DUPLICATES), duplicates.to_dict())
        ctx.reporter.log(f"{duplicates.summary()}; list in {ctx.path(DUPLICATES)}")
        result["duplicates"] = duplicates.counts()
    return result


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
    boards = ctx.path(BOARDS)
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
    except (FileNotFoundError, ValueError) as e:
        raise StepError(str(e)) from None
    raise StepError(f"unknown dataset kind {kind!r}: use deeppcb or folder")


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


# ------------------------------------------------------------------------------------------------ validate_data
def validate_data(ctx: StepContext, data: DataConfig) -> dict[str, Any]:
    """Validate the snapshot (quarantine with reasons) and cut candidate crops from the accepted boards, or fit the
    accepted images. Fails over ``data.validation.max_bad_fraction`` (unusable or leaking samples) or
    ``data.validation.max_conflict_fraction`` (label conflicts); the result counts ``label_conflicts``."""
    from defectops.training.crops import build_crops
    from defectops.training.images import build_image_crops
    from defectops.training.validation import CONFLICT, validate_snapshot

    snap = load_snapshot(ctx.path(SNAPSHOT))
    advance = ctx.reporter.task("validating boards", len(snap.samples))
    report = validate_snapshot(snap, data.validation, progress=advance)
    write_json(ctx.path(VALIDATION), report.to_dict())
    v = data.validation
    bad = [q for q in report.quarantined if q.kind != CONFLICT]
    conflicts = [q for q in report.quarantined if q.kind == CONFLICT]
    if report.bad_fraction > v.max_bad_fraction:
        first = "; ".join(f"{q.path}: {q.reason}" for q in bad[:3])
        raise StepError(f"{len(bad)} of {report.total} samples quarantined (over "
                        f"data.validation.max_bad_fraction={v.max_bad_fraction}): {first}; "
                        f"full list in {ctx.path(VALIDATION)}")
    if report.conflict_fraction > v.max_conflict_fraction:
        first = "; ".join(f"{q.path}: {q.reason}" for q in conflicts[:3])
        raise StepError(f"{len(conflicts)} of {report.total} samples are label conflicts, the same content "
                        f"under two labels (over data.validation.max_conflict_fraction={v.max_conflict_fraction}): "
                        f"{first}; fix the class folders; full list in {ctx.path(VALIDATION)}")
    if report.quarantined:
        ctx.reporter.log(f"{report.summary()}; list in {ctx.path(VALIDATION)}")
    boards = any("template" in x for x in snap.samples)
    advance = ctx.reporter.task("cutting candidate crops" if boards else "fitting images", len(report.accepted))
    with atomic_dir(ctx.path(CROPS)) as tmp:
        if boards:
            crops, stats = build_crops(snap, report.accepted, tmp, data.candidates, snap.classes, data.good_class,
                                       progress=advance)
            extra = stats.to_dict()
        else:
            crops = build_image_crops(snap, report.accepted, tmp, data.candidates.crop_size, data.fit_mode,
                                      progress=advance, max_pixels=data.validation.max_image_pixels)
            extra = {"crops": {sp: dict(Counter(x["label"] for x in crops.samples if x["split"] == sp))
                               for sp in ("train", "val", "test")}}
    out = {"quarantined": len(report.quarantined), "accepted": len(report.accepted),
           "label_conflicts": len(conflicts), **extra, "crop_fingerprint": crops.fingerprint}
    shortcut = _shortcut_check(ctx, data, snap, crops, boards)
    if shortcut is not None:
        out["shortcut"] = shortcut
    return out


BOARD_SHORTCUT_FIX = ("the classifier can learn the candidate's size (crops are scaled to their box) instead of the "
                      "defect; check that false calls and defects come from boxes of similar sizes "
                      "(data.candidates.pad, data.candidates.add_missed_to_train)")


def _shortcut_check(ctx: StepContext, data: DataConfig, snap: Snapshot, crops: Snapshot, boards: bool
                    ) -> dict[str, Any] | None:
    """Run :func:`evaluation.shortcut.shortcut_check` on the train and val samples' metadata, write ``SHORTCUT`` and
    log a warning when it fires; returns the step result's summary. Never fails the step: an error becomes a note."""
    from defectops.training.crops import box_metadata
    from defectops.training.images import image_metadata

    cfg = data.shortcut
    path = ctx.path(SHORTCUT)
    if not cfg.enabled:
        path.unlink(missing_ok=True)
        return None
    kind = "candidate boxes" if boards else "image files"
    try:
        used = [x for x in crops.samples if x["split"] in ("train", "val")]
        index = {c: i for i, c in enumerate(crops.classes)}
        y = np.array([index[x["label"]] for x in used], np.int64)
        if boards:
            feats, names = box_metadata([x["box"] for x in used])
        else:
            feats, names = image_metadata([snap.file(x["source"]) for x in used])
        rep = shortcut_check(feats, names, y, crops.classes, folds=cfg.folds, seed=data.split.seed,
                             warn_at=cfg.warn_at, fix=BOARD_SHORTCUT_FIX if boards else DEFAULT_FIX)
        doc: dict[str, Any] = {"metadata": kind, "splits": ["train", "val"], **rep.to_dict()}
    except Exception as e:  # the check is advice: a failure must not stop the run
        doc = {"metadata": kind, "warn": False, "score": None, "note": f"not checked: {type(e).__name__}: {e}"}
    write_json(path, doc)
    if doc.get("warn"):
        ctx.reporter.log(f"WARNING {doc['message']} (details: {path})")
    elif doc.get("note") and doc.get("score") is None:
        ctx.reporter.log(f"shortcut check: {doc['note']}")
    return {k: doc.get(k) for k in ("warn", "score", "top_feature", "top_feature_score", "note")}


# ------------------------------------------------------------------------------------------------------- train
def _registry_client(ctx: StepContext, registry: RegistryConfig) -> tuple[Any, str]:
    from defectops.registry import mlflow_registry as reg

    uri = tracking_uri(registry, ctx.home)
    c = reg.client(uri)
    exp = reg.ensure_experiment(c, registry.experiment, artifact_location(registry, ctx.home))
    return c, exp


def _mlflow_run(ctx: StepContext, registry: RegistryConfig) -> tuple[Any, str]:
    from defectops.registry import mlflow_registry as reg

    c, exp = _registry_client(ctx, registry)
    f = ctx.path(MLFLOW_RUN)
    existing = read_json(f)["run_id"] if f.is_file() else None
    rid = reg.start_run(c, exp, ctx.run_id, existing, {"defectops.run_id": ctx.run_id,
                                                       "defectops.config_hash": ctx.config_hash})
    if rid != existing:
        write_json(f, {"run_id": rid, "tracking_uri": c.tracking_uri})
    return c, rid


def train(ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig, registry: RegistryConfig,
          seed: int) -> dict[str, Any]:
    """Train the crop classifier with checkpoints every epoch; a rerun resumes from the newest checkpoint.

    ``train.nproc`` > 1 trains with DistributedDataParallel. Outside torchrun this step starts
    ``torchrun --standalone --nproc_per_node=<nproc>``
    of its own worker (``python -m defectops.pipelines.runner train``) and
    returns rank 0's result; under torchrun (``RANK``/``WORLD_SIZE`` set, e.g. ``torchrun ... defectops step train``)
    each process joins the group. Only rank 0 writes checkpoints, ``model.pt``, the MLflow run and the step marker.
    """
    from defectops.training import distributed

    if train.nproc > 1 and not distributed.launched_by_torchrun():
        return _train_with_torchrun(ctx, model, train)
    owned = not distributed.is_initialized()
    distributed.init_from_env(train.device)
    try:
        return _train(ctx, data, model, train, registry, seed)
    finally:
        if owned:
            distributed.cleanup()


def _train(ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig, registry: RegistryConfig,
           seed: int) -> dict[str, Any]:
    import torch

    from defectops.registry import mlflow_registry as reg
    from defectops.training import distributed
    from defectops.training.data import class_counts, load_split
    from defectops.training.trainer import CheckpointError, fit

    main, world = distributed.rank() == 0, distributed.world_size()
    crops = load_snapshot(ctx.path(CROPS))
    x_train, y_train, _ = load_split(crops, "train")
    x_val, y_val, _ = load_split(crops, "val")
    c: Any = None
    rid = ""
    if main:
        c, rid = _mlflow_run(ctx, registry)
        reg.log_params(c, rid, {"model": model.name, "epochs": train.epochs, "batch_size": train.batch_size,
                                "lr": train.lr, "sampler": train.sampler, "loss": train.loss.name,
                                "gamma": train.loss.gamma, "seed": seed, "train_samples": len(y_train),
                                "nproc": world, "dataset_fingerprint": load_snapshot(ctx.path(SNAPSHOT)).fingerprint})
    per_epoch = len(y_train) // train.batch_size * train.batch_size if len(y_train) > train.batch_size else len(y_train)
    advance = ctx.reporter.task(f"training {model.name}" + (f" on {world} processes" if world > 1 else ""),
                                train.epochs * per_epoch) if main else (lambda n: None)

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            if k != "epoch":
                c.log_metric(rid, f"train_{k}" if not k.startswith("val_") else k, float(v), step=epoch)
        ctx.reporter.log(f"epoch {epoch}/{train.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()
                                                                     if k != "epoch"))

    try:
        result = fit(x_train, y_train, crops.classes, model, train, ctx.path(CHECKPOINTS), seed=seed,
                     val=(x_val, y_val), on_epoch=on_epoch, on_batch=advance if world == 1 else
                     (lambda n: advance(n * world)))
    except CheckpointError as e:
        raise StepError(str(e)) from None
    if not main:
        return {"epochs": len(result.history), "resumed_from_epoch": result.resumed_from, "rank": distributed.rank()}
    if result.resumed_from:
        advance(result.resumed_from * per_epoch)
    with atomic_path(ctx.path(MODEL)) as tmp:
        state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
        for k in ("optimizer", "scheduler"):
            state.pop(k, None)
        torch.save(state, tmp)
    out = {"epochs": len(result.history), "resumed_from_epoch": result.resumed_from, "mlflow_run_id": rid,
           "selected_epoch": result.selected_epoch, "select": train.select,
           "selected": result.history[result.selected_epoch - 1] if result.selected_epoch else {},
           "final": result.history[-1] if result.history else {}, "class_counts": class_counts(y_train, crops.classes)}
    weights = state.get("weights_info") or {}
    reg.log_params(c, rid, {"selected_epoch": result.selected_epoch,
                            "pretrained_weights": weights.get("weights", "none"),
                            "pretrained_sha256": weights.get("weights_sha256", "none")})
    if weights:
        out["pretrained"] = weights
    if world > 1:
        out["nproc"] = world
    return out


WORKER_PREFIX = "defectops-worker:"
"""Lines a distributed step's rank 0 prints for the launching process: ``<prefix>{"log"|"advance"|"error": ...}``."""


def _train_with_torchrun(ctx: StepContext, model: ModelConfig, train: TrainConfig) -> dict[str, Any]:
    """Run the train step in ``train.nproc`` processes under ``torchrun --standalone`` and return rank 0's result.

    Rank 0's progress and epoch lines are forwarded to this step's reporter; a failure becomes a :class:`StepError`
    with rank 0's message. The workers end with this process (and with torchrun, even on SIGKILL).
    """
    import os
    import sys
    from collections import deque

    import torch

    n = train.nproc
    if resolve_device(train.device).type == "cuda" and n > torch.cuda.device_count():
        raise StepError(f"train.nproc={n} but only {torch.cuda.device_count()} GPU(s) are visible: set train.nproc to "
                        f"at most that, or train.device=cpu")
    if train.batch_size % n:
        raise StepError(f"train.batch_size={train.batch_size} does not split evenly over train.nproc={n} processes: "
                        f"use a multiple of {n} (the global batch stays train.batch_size)")
    marker = ctx.root / "steps" / "train.json"  # rank 0 records its result there (pipelines.runner.run_step)
    before = marker.stat().st_mtime_ns if marker.is_file() else None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "defectops.pipelines.runner", "train", "--run-root", str(ctx.root), "--home", str(ctx.home)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    n_train = sum(1 for x in load_snapshot(ctx.path(CROPS)).samples if x["split"] == "train")
    per_epoch = n_train // train.batch_size * train.batch_size if n_train > train.batch_size else n_train
    advance = ctx.reporter.task(f"training {model.name} on {n} processes (torchrun)", train.epochs * per_epoch)
    tail: deque[str] = deque(maxlen=40)
    error = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line[len(WORKER_PREFIX):]) if line.startswith(WORKER_PREFIX) else None
            except json.JSONDecodeError:  # a line garbled by another process's output
                msg = None
            if not isinstance(msg, dict):
                tail.append(line.rstrip())
                continue
            if "advance" in msg:
                advance(int(msg["advance"]))
            elif "log" in msg:
                ctx.reporter.log(msg["log"])
            elif "error" in msg:
                error = msg["error"]
        code = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0 or not marker.is_file() or marker.stat().st_mtime_ns == before:
        detail = error or " | ".join(x for x in list(tail)[-8:] if x.strip()) or f"exit code {code}"
        raise StepError(f"distributed training ({n} processes) failed: {detail}")
    return dict(read_json(marker)["result"])


# ---------------------------------------------------------------------------------------------------- evaluate
def _champion_metrics(ctx: StepContext, registry: RegistryConfig, x: np.ndarray, y: np.ndarray,
                      classes: tuple[str, ...], good_class: str) -> tuple[ClassificationMetrics | None, str]:
    """Score the current champion on this run's test crops (a like-for-like no-regression baseline)."""
    import mlflow.artifacts
    import mlflow.pytorch

    from defectops.registry import mlflow_registry as reg
    from defectops.training.data import to_tensor
    from defectops.training.engine import predict_logits, softmax

    c, _ = _registry_client(ctx, registry)
    mv = reg.alias_version(c, registry.model_name, registry.champion_alias)
    if mv is None:
        return None, "none (no champion yet)"
    label = f"version {mv.version}"
    try:
        uri = c.get_model_version_download_uri(registry.model_name, str(mv.version))
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=c.tracking_uri)
            net = mlflow.pytorch.load_model(local, map_location="cpu")
        logits = predict_logits(net, to_tensor(x), resolve_device("cpu"))
    except Exception as e:  # an unloadable champion is reported, and the regression gates are then not applied
        return None, f"{label} could not be evaluated ({type(e).__name__}: {str(e)[:120]})"
    if logits.shape[1] != len(classes):
        return None, f"{label} has {logits.shape[1]} classes, this run {len(classes)}: not comparable"
    return classification_metrics(y, softmax(logits), classes, good_class), label


def _detector_settings(classes: tuple[str, ...], data: DataConfig, detect: DetectConfig,
                       threshold: float = 0.5) -> Any:
    from defectops.serving.detector import DetectorSettings
    from defectops.training.crops import candidate_params

    c = data.candidates
    return DetectorSettings(classes=classes, good_class=data.good_class, crop_size=c.crop_size, context=c.context,
                            candidates=candidate_params(c), score_threshold=threshold, box_margin=c.box_margin,
                            merge=detect.merge, confidence=detect.confidence)


def _board_split(ctx: StepContext, split: str
                 ) -> tuple[list[tuple[str, Path, Path]], dict[str, list[Any]], dict[str, str]]:
    """Accepted board pairs of ``split``, their ground truth and their group (board design), keyed by image stem."""
    from defectops.evaluation.deeppcb import GroundTruth

    snap = load_snapshot(ctx.path(SNAPSHOT))
    quarantined = {q["index"] for q in read_json(ctx.path(VALIDATION))["quarantined"]}
    pairs, gts, groups = [], {}, {}
    for i, s in enumerate(snap.samples):
        if s["split"] != split or i in quarantined or "template" not in s:
            continue
        key = Path(s["path"]).name.removesuffix("_test.jpg")
        pairs.append((key, snap.file(s["template"]), snap.file(s["path"])))
        gts[key] = [GroundTruth(b[0], b[1], b[2], b[3], b[4]) for b in s.get("boxes", [])]
        groups[key] = sample_group(s)
    return pairs, gts, groups


def board_evaluation(ctx: StepContext, data: DataConfig, detect: DetectConfig, classes: tuple[str, ...],
                     logits_fn: Any, threshold: float | None, confidence: float = 0.95,
                     type_thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Detect on the val and test boards; choose the score threshold (and with ``detect.threshold_per_type`` one per
    defect type) on val, unless given; score test. Each split also gets bootstrap intervals over boards
    (``intervals``) and its scores per board design (``per_group``, ``worst_group``)."""
    from defectops.evaluation.deeppcb import boxes_found, score
    from defectops.serving.detector import (
        CONFIDENCES,
        SELECT_OBJECTIVES,
        THRESHOLD_GRID,
        BoardDetector,
        detections_from_probs,
        select_thresholds,
    )
    from defectops.training.candidates import detection_box

    settings = _detector_settings(classes, data, detect)
    detector = BoardDetector(logits_fn, settings, threads=detect.threads, batch_boards=detect.batch_boards)
    out: dict[str, Any] = {"settings": {"candidates": settings.candidates, "box_margin": settings.box_margin,
                                        "crop_size": settings.crop_size, "context": settings.context,
                                        "merge": settings.merge, "confidence": settings.confidence}}
    runs = {}
    groups: dict[str, str] = {}
    for split in ("val", "test"):
        pairs, gts, split_groups = _board_split(ctx, split)
        groups |= split_groups
        advance = ctx.reporter.task(f"detecting on {split} boards", len(pairs))
        t0 = time.perf_counter()
        results = []
        for r in detector.run(pairs):
            results.append(r)
            advance(1)
        runs[split] = (results, gts, len(pairs) / max(time.perf_counter() - t0, 1e-9))

    def images_at(split: str, t: float, per_type: Mapping[str, float]) -> dict[str, Any]:
        results, gts, _ = runs[split]
        return {r.key: (gts[r.key], detections_from_probs(r.candidates, r.probs, settings, r.shape, t, per_type))
                for r in results}

    def score_at(split: str, t: float, per_type: Mapping[str, float]) -> Any:
        return score(images_at(split, t, per_type), iou_threshold=detect.iou_threshold)

    if detect.select not in SELECT_OBJECTIVES:
        raise StepError(f"detect.select={detect.select} is unknown: use {', '.join(SELECT_OBJECTIVES)}")
    if detect.confidence not in CONFIDENCES:
        raise StepError(f"detect.confidence={detect.confidence} is unknown: use {', '.join(CONFIDENCES)}")
    type_thresholds = dict(type_thresholds or {})
    if threshold is None and not runs["val"][0]:
        threshold = 0.5
    elif threshold is None:  # best val objective on a grid (serving.detector.select_thresholds)
        objective = SELECT_OBJECTIVES[detect.select]
        threshold, type_thresholds = select_thresholds(
            lambda t, per: objective(score_at("val", t, per)), [c for c in classes if c != data.good_class],
            grid=THRESHOLD_GRID, per_type=detect.threshold_per_type)
    for split in ("val", "test"):
        results, gts, ips = runs[split]
        if results:
            found = [f for r in results for f in boxes_found(
                gts[r.key], [detection_box(c, settings.box_margin, r.shape) for c in r.candidates],
                detect.iou_threshold)]
            images = images_at(split, threshold, type_thresholds)
            out[split] = {**score(images, iou_threshold=detect.iou_threshold).to_dict(), "images_per_s": ips,
                          "boards": len(results), "ceiling_recall": float(np.mean(found)) if found else None,
                          **board_breakdown(images, groups, iou_threshold=detect.iou_threshold,
                                            confidence=confidence)}
    out["score_threshold"] = threshold
    out["type_thresholds"] = type_thresholds
    return out


def _crop_units(crops: Snapshot, paths: list[str]) -> list[str]:
    """The resampling unit of each crop: the board it was cut from (``source`` is ``<board>#<k>`` for candidate
    crops), else its ``group`` when the manifest records one, else the crop itself."""
    by_path = {s["path"]: s for s in crops.samples}
    units = []
    for p in paths:
        s = by_path.get(p, {})
        source = str(s.get("source", ""))
        if s.get("origin") in ("candidate", "missed-gt") and "#" in source:
            units.append("board:" + source.rsplit("#", 1)[0])
        else:
            units.append(f"group:{s['group']}" if s.get("group") else "crop:" + p)
    return units


def _interval_unit(units: list[str]) -> str:
    kinds = {u.split(":", 1)[0] for u in units}
    if kinds == {"group", "crop"}:
        return "images (a duplicate group as one)"
    return {"board": "boards", "group": "groups", "crop": "crops"}.get(kinds.pop(), "units") if len(kinds) == 1 \
        else "boards or crops"


def metrics_intervals(metrics: ClassificationMetrics, y: np.ndarray, pred: np.ndarray, units: list[str],
                      confidence: float) -> ClassificationIntervals:
    """Wilson intervals of the recalls and rates, and macro recall bootstrapped over ``units`` (seed 0)."""
    macro = bootstrap_macro_recall(y, pred, len(metrics.classes), groups=units, confidence=confidence, seed=0,
                                   unit=_interval_unit(units))
    return classification_intervals(metrics, confidence, macro_recall=macro)


def evaluate(ctx: StepContext, data: DataConfig, gates: GateConfig, registry: RegistryConfig,
             detect: DetectConfig) -> dict[str, Any]:
    """Score the trained model on the test crops (and boards), apply the gates, write metrics and the HTML report."""
    from defectops.training.data import load_split, to_tensor
    from defectops.training.engine import predict_logits, softmax
    from defectops.training.trainer import CheckpointError, load_trained_model

    if not 0.0 < gates.confidence < 1.0:
        raise StepError(f"gates.confidence={gates.confidence} must lie strictly between 0 and 1: use e.g. 0.95")
    crops = load_snapshot(ctx.path(CROPS))
    x, y, paths = load_split(crops, "test")
    if len(y) == 0:
        raise StepError("the test split has no crops: add boards (data.synth.n_boards) or raise data.split.test")
    try:
        net, state = load_trained_model(ctx.path(MODEL))
    except CheckpointError as e:
        raise StepError(str(e)) from None
    logits = predict_logits(net, to_tensor(x), resolve_device("cpu"))
    probs = softmax(logits)
    metrics = classification_metrics(y, probs, crops.classes, data.good_class)
    champion, champion_version = _champion_metrics(ctx, registry, x, y, crops.classes, data.good_class)
    if champion is not None:
        write_json(ctx.path(CHAMPION_METRICS), champion.to_dict())
    board = None
    if detect.enabled and _has_boards(ctx):
        import torch

        def torch_logits(batch: np.ndarray) -> np.ndarray:
            return predict_logits(net, torch.from_numpy(batch), resolve_device("cpu"))

        board = board_evaluation(ctx, data, detect, crops.classes, torch_logits, detect.score_threshold,
                                 gates.confidence)
        write_json(ctx.path(BOARD_METRICS), board)
        write_json(ctx.path(DETECTOR), {"score_threshold": board["score_threshold"],
                                        "type_thresholds": board["type_thresholds"], **board["settings"]})
    report = evaluate_gates(metrics, gates, champion=champion, board=board.get("test") if board else None)
    with atomic_path(ctx.path(PREDICTIONS)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, logits=logits, labels=y, paths=np.asarray(paths))
    intervals = metrics_intervals(metrics, y, probs.argmax(1), _crop_units(crops, paths), gates.confidence)
    write_json(ctx.path(METRICS), {**metrics.to_dict(), "intervals": intervals.to_dict()})
    write_json(ctx.path(GATES), report.to_dict())
    _write_report(ctx, net, metrics, report, probs, y, x, crops, state, champion_version, board, intervals)
    result: dict[str, Any] = {"passed": report.passed, "failed": [g.name for g in report.failed()],
                              "macro_recall": metrics.macro_recall, "champion_version": champion_version}
    if board and "test" in board:
        result["board"] = {k: board["test"][k] for k in ("map", "fscore", "precision", "recall", "images_per_s")}
        result["board"]["score_threshold"] = board["score_threshold"]
        if board["type_thresholds"]:
            result["board"]["type_thresholds"] = board["type_thresholds"]
    return result


def _has_boards(ctx: StepContext) -> bool:
    return any("template" in s for s in load_snapshot(ctx.path(SNAPSHOT)).samples)


def _write_report(ctx: StepContext, net: Any, metrics: ClassificationMetrics, gates: GateReport, probs: np.ndarray,
                  y: np.ndarray, x: np.ndarray, crops: Snapshot, state: dict[str, Any],
                  champion_version: str, board: dict[str, Any] | None,
                  intervals: ClassificationIntervals | None = None) -> None:
    from defectops.evaluation.gradcam import grad_cam, overlay
    from defectops.training.data import to_tensor
    from defectops.training.models import model_family

    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    worst = wrong[np.argsort(-probs[wrong, pred[wrong]])][:16]
    cams: Any = (grad_cam(net, model_family(str(state["model_name"])), to_tensor(x[worst]), pred[worst].tolist())
            if len(worst) else [])
    misses = [Miss(image=overlay(x[i], cam), true_label=crops.classes[y[i]], predicted=crops.classes[pred[i]],
                   confidence=float(probs[i, pred[i]]), caption="Grad-CAM of the predicted class over the crop")
              for i, cam in zip(worst, cams, strict=True)]
    info = {"run id": ctx.run_id, "model": str(state.get("model_name")), "epochs": str(state.get("epoch")),
            "dataset fingerprint": load_snapshot(ctx.path(SNAPSHOT)).fingerprint[:16],
            "test crops": str(len(y)), "champion compared": champion_version}
    sections = [("Board-level detection (DeepPCB metric)", _board_html(board))] if board else []
    write_miss_tiles(ctx.path(MISSES), misses)
    render_report(ctx.path(REPORT), title=f"DefectOps evaluation: {ctx.run_id}", metrics=metrics, gates=gates,
                  curves=pr_curves(y, probs, crops.classes), info=info, misses=misses, sections=sections,
                  intervals=intervals, split_note=_split_note(len(y), intervals), shortcut=_read_shortcut(ctx))


def _read_shortcut(ctx: StepContext) -> ShortcutReport | None:
    """validate_data's shortcut check (``SHORTCUT``) for the report, or None when it was not run or is unreadable."""
    f = ctx.path(SHORTCUT)
    try:
        return ShortcutReport.from_dict(read_json(f)) if f.is_file() else None
    except (ValueError, TypeError, OSError):
        return None


def _split_note(n_crops: int, intervals: ClassificationIntervals | None) -> str:
    """The report's sentence on where the figures come from and what their intervals are."""
    text = f"All figures are on the held-out test split ({n_crops} crops); training and selection use train and val."
    if intervals is None:
        return text
    level = f"{100 * intervals.confidence:g} %"
    text += f" Brackets: {level} Wilson score intervals for the recalls and rates"
    macro = intervals.macro_recall
    if macro is not None and macro.defined:
        text += f"; macro recall: percentile bootstrap over {macro.n} {macro.unit} ({DEFAULT_RESAMPLES} resamples)"
    return text + "."


def _iv(d: dict[str, Any] | None, key: str) -> str:
    from html import escape

    from defectops.evaluation.intervals import Interval

    if not d or not d.get(key):
        return ""
    return f' <span class="muted">{escape(Interval.from_dict(d[key]).format_bounds(4))}</span>'


def _board_html(board: dict[str, Any]) -> str:
    from html import escape

    rows, designs = [], []
    for split in ("val", "test"):
        if split in board:
            b = board[split]
            iv = b.get("intervals")
            ceiling = "-" if b.get("ceiling_recall") is None else f"{b['ceiling_recall']:.4f}"
            rows.append(f"<tr><td>{split}</td><td>{b['boards']}</td><td>{b['map']:.4f}{_iv(iv, 'map')}</td>"
                        f"<td>{b['fscore']:.4f}{_iv(iv, 'fscore')}</td>"
                        f"<td>{b['precision']:.4f}</td><td>{b['recall']:.4f}</td><td>{ceiling}</td>"
                        f"<td>{b['images_per_s']:.1f}</td></tr>")
            worst = (b.get("worst_group") or {}).get("group")
            for g, m in (b.get("per_group") or {}).items():
                mark = ' <span class="muted">(worst)</span>' if g == worst and len(b["per_group"]) > 1 else ""
                designs.append(f"<tr><td>{split}</td><td class=\"mono\">{escape(g)}{mark}</td><td>{m['boards']}</td>"
                               f"<td>{m['map']:.4f}</td><td>{m['fscore']:.4f}</td><td>{m['precision']:.4f}</td>"
                               f"<td>{m['recall']:.4f}</td></tr>")
    head = ("<table><thead><tr><th>split</th><th>boards</th><th>mAP</th><th>F-score</th><th>precision</th>"
            "<th>recall</th><th>candidate ceiling</th><th>images/s</th></tr></thead><tbody>")
    level = next((f"{100 * b['intervals']['map']['confidence']:g} %" for b in (board.get("test"), board.get("val"))
                  if b and b.get("intervals")), None)
    bootstrap = f" Brackets: {level} percentile bootstrap over boards ({DEFAULT_RESAMPLES} resamples, seed 0)."
    per_type = ", ".join(f"{k} {v}" for k, v in (board.get("type_thresholds") or {}).items())
    per_type = f" (per type: {escape(per_type)}; other types {board['score_threshold']})" if per_type else ""
    note = (f"<p>IoU &gt; {escape(str(0.33))}; score threshold {board['score_threshold']}{per_type} chosen on the val "
            f"split, applied unchanged to test.{bootstrap if level else ''}</p>")
    per_design = ("<h3>Per board design</h3><table><thead><tr><th>split</th><th>design</th><th>boards</th>"
                  "<th>mAP</th><th>F-score</th><th>precision</th><th>recall</th></tr></thead><tbody>"
                  + "".join(designs) + "</tbody></table>") if designs else ""
    return head + "".join(rows) + "</tbody></table>" + note + per_design


# ---------------------------------------------------------------------------------------------------- register
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_user() -> str:
    """Who is acting: $DEFECTOPS_USER, else the operating-system user."""
    import getpass
    import os

    return os.environ.get("DEFECTOPS_USER") or getpass.getuser()


def _review_evidence(ctx: StepContext) -> Path:
    """``register/evidence/``: what the review page shows besides metrics and gates. ``dataset.json`` (fingerprints,
    sample counts per split and class, validation summary) and ``misses/`` (the report's worst-miss tiles with their
    Grad-CAM overlays as PNG files, ``misses/index.json`` listing them, as the evaluate step wrote them)."""
    out = ctx.path("register/evidence")
    if (out / "dataset.json").is_file():
        return out
    with atomic_dir(out) as tmp:
        crops_meta = ctx.path(CROPS) / "snapshot.json"
        crops = read_json(crops_meta) if crops_meta.is_file() else {}
        snap = load_snapshot(ctx.path(SNAPSHOT))
        stats = crops.get("stats") or {}
        write_json(tmp / "dataset.json", {
            "dataset_fingerprint": snap.fingerprint, "crops_fingerprint": crops.get("fingerprint"),
            "samples": len(snap.samples), "crops": crops.get("num_samples"), "boards": stats.get("boards"),
            "crops_per_split": stats.get("crops") or {}, "defects": stats.get("defects") or {},
            "candidate_recall": stats.get("candidate_recall_overall"),
            "validation": read_json(ctx.path(VALIDATION)) if ctx.path(VALIDATION).is_file() else {}})
        if ctx.path(MISSES).is_dir():
            shutil.copytree(ctx.path(MISSES), tmp / "misses")
        else:  # evaluated before the evaluate step wrote its tiles
            (tmp / "misses").mkdir()
            write_json(tmp / "misses" / "index.json", [])
    return out


def register(ctx: StepContext, registry: RegistryConfig) -> dict[str, Any]:
    """Register the model version with its evidence; only a version that passed its gates becomes challenger."""
    import mlflow.pytorch

    from defectops.registry import mlflow_registry as reg
    from defectops.training.trainer import load_trained_model

    gates = GateReport.from_dict(read_json(ctx.path(GATES)))
    c, rid = _mlflow_run(ctx, registry)
    net, state = load_trained_model(ctx.path(MODEL))
    model_dir = ctx.path("register/model")
    # pickle, not pt2: pt2 traces a fixed batch size. MLflow warns about pickle on every save: noise here.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    if not (model_dir / "MLmodel").is_file():
        with atomic_dir(model_dir) as tmp:
            shutil.rmtree(tmp)
            size = int(state["img_size"])
            mlflow.pytorch.save_model(net, str(tmp), serialization_format="pickle",
                                      input_example=np.zeros((1, 3, size, size), np.float32),
                                      pip_requirements=["defectops", "torch==2.14.1", "timm"])
    c.log_artifact(rid, str(ctx.path(METRICS)))
    for evidence in (GATES, REPORT, VALIDATION, "config.yaml"):
        c.log_artifact(rid, str(ctx.path(evidence)), "evidence")
    c.log_artifacts(rid, str(_review_evidence(ctx)), "evidence")
    c.log_artifacts(rid, str(model_dir), "model")
    from defectops.pipelines.drift_steps import write_reference_profile  # the drift reference profile (docs/drift.md)
    c.log_artifacts(rid, str(write_reference_profile(ctx)), "drift")
    metrics = read_json(ctx.path(METRICS))
    for k in ("accuracy", "macro_recall", "escape_rate", "false_call_rate"):
        if metrics.get(k) is not None:
            c.log_metric(rid, f"test_{k}", float(metrics[k]))
    fingerprint = load_snapshot(ctx.path(SNAPSHOT)).fingerprint
    source = f"{c.get_run(rid).info.artifact_uri}/model"
    tags = {
        "defectops.dataset_fingerprint": fingerprint,
        "defectops.git_commit": _git_commit(),
        "defectops.config_hash": ctx.config_hash,
        "defectops.gates_passed": str(gates.passed).lower(),
        "defectops.gates_failed": ",".join(g.name for g in gates.failed()) or "none",
        "defectops.macro_recall": f"{metrics['macro_recall']:.4f}",
        "defectops.review_status": "pending" if gates.passed else "not-eligible",
    }
    try:
        mv = reg.register(c, registry.model_name, source, rid, ctx.run_id, tags,
                          description=f"DefectOps run {ctx.run_id}")
    except Exception as e:
        raise StepError(f"could not register in MLflow at {c.tracking_uri}: {str(e)[:200]}") from None
    if "defectops.registered_by" not in mv.tags:  # the submitter may not approve it later (separation of duties)
        from defectops.registry.governance import record_register

        record_register(c, registry.model_name, str(mv.version), actor=current_user(), role="ml-engineer",
                        lock_dir=ctx.home)
    if gates.passed:
        c.set_registered_model_alias(registry.model_name, registry.challenger_alias, str(mv.version))
    result = {"registered_model": registry.model_name, "version": str(mv.version),
              "aliases": reg.aliases_of(c, registry.model_name, str(mv.version)), "tracking_uri": c.tracking_uri,
              "mlflow_run_id": rid, "gates_passed": gates.passed}
    write_json(ctx.path(REGISTRATION), result)
    if not gates.passed:
        failed = [f"{g.name} ({g.detail})" for g in gates.failed()]
        raise GateFailure(f"gates failed, version {mv.version} registered without '{registry.challenger_alias}': "
                          + "; ".join(failed), [g.name for g in gates.failed()])
    return result


# ------------------------------------------------------------------------------------------------------ export
def export(ctx: StepContext, export: ExportConfig, data: DataConfig) -> dict[str, Any]:
    """Export the trained model to ONNX (dynamic batch) carrying its classes, input size and detector settings."""
    from defectops.serving.model_ref import model_metadata
    from defectops.serving.onnx_export import export_onnx
    from defectops.training.trainer import load_trained_model

    net, state = load_trained_model(ctx.path(MODEL))
    size = int(state["img_size"])
    detector = read_json(ctx.path(DETECTOR)) if ctx.path(DETECTOR).is_file() else {}
    crops_meta = read_json(ctx.path(CROPS) / "snapshot.json")
    task = "aoi" if _has_boards(ctx) else "folder"
    meta = model_metadata(list(state["classes"]), data.good_class, size, task, fit_mode=data.fit_mode,
                          candidates=detector.get("candidates"), detector=detector,
                          extra={"run_id": ctx.run_id, "dataset_fingerprint": crops_meta.get("board_fingerprint", "")})
    export_onnx(net, ctx.path(ONNX), input_shape=(3, size, size), opset=export.opset, metadata=meta)
    result: dict[str, Any] = {"onnx_path": str(ctx.path(ONNX)), "opset": export.opset,
                              "bytes": ctx.path(ONNX).stat().st_size}
    if export.int8.enabled:
        result["int8"] = _export_int8(ctx, export)
    return result


def _export_int8(ctx: StepContext, export: ExportConfig) -> dict[str, Any]:
    """Quantize the FP32 export to INT8, calibrated on a class-stratified sample of the training crops."""
    from defectops.serving.quantize import calibration_sample, quantize_int8
    from defectops.training.data import load_split, to_tensor

    q = export.int8
    x, y, _ = load_split(load_snapshot(ctx.path(CROPS)), "train")
    idx = calibration_sample(y, q.calibration_samples, seed=0)
    calibration = {"samples": len(idx), "method": q.method, "per_channel": q.per_channel}
    quantize_int8(ctx.path(ONNX), ctx.path(ONNX_INT8), to_tensor(x[idx]).numpy(), per_channel=q.per_channel,
                  method=q.method, extra_metadata={"defectops.precision": "int8",
                                                   "defectops.int8_calibration": json.dumps(calibration)})
    return {"path": str(ctx.path(ONNX_INT8)), "bytes": ctx.path(ONNX_INT8).stat().st_size, **calibration}


def verify_export(ctx: StepContext, data: DataConfig, export: ExportConfig, gates: GateConfig,
                  registry: RegistryConfig, detect: DetectConfig) -> dict[str, Any]:
    """Re-evaluate the ONNX model through onnxruntime: parity with PyTorch and the same gates; then publish it as a
    Triton model repository. A failure removes the challenger alias."""
    from defectops.registry import mlflow_registry as reg
    from defectops.serving.model_ref import SERVED_TAG
    from defectops.serving.onnx_export import onnx_logits, onnx_session, parity
    from defectops.serving.triton import write_repository
    from defectops.training.data import load_split, to_tensor
    from defectops.training.engine import softmax

    crops = load_snapshot(ctx.path(CROPS))
    x, y, paths = load_split(crops, "test")
    ref = np.load(ctx.path(PREDICTIONS))["logits"]
    session = onnx_session(ctx.path(ONNX))
    logits = onnx_logits(session, to_tensor(x).numpy())
    par = parity(ref, logits)
    metrics = classification_metrics(y, softmax(logits), crops.classes, data.good_class)
    baseline = ctx.path(CHAMPION_METRICS)
    champion = ClassificationMetrics.from_dict(read_json(baseline)) if baseline.is_file() else None
    board = None
    if ctx.path(DETECTOR).is_file():
        chosen = read_json(ctx.path(DETECTOR))
        board = board_evaluation(ctx, data, detect, crops.classes, lambda b: onnx_logits(session, b),
                                 chosen["score_threshold"], gates.confidence, chosen.get("type_thresholds"))
        write_json(ctx.path(ONNX_BOARD_METRICS), board)
    report = evaluate_gates(metrics, gates, champion=champion, board=board.get("test") if board else None)
    write_json(ctx.path(PARITY), par.to_dict())
    units = _crop_units(crops, paths)
    intervals = metrics_intervals(metrics, y, logits.argmax(1), units, gates.confidence)
    write_json(ctx.path(ONNX_METRICS), {**metrics.to_dict(), "intervals": intervals.to_dict()})
    write_json(ctx.path(ONNX_GATES), report.to_dict())
    registration = read_json(ctx.path(REGISTRATION))
    c, rid = _mlflow_run(ctx, registry)
    version = registration["version"]
    problems = []
    if par.top1_agreement < export.min_top1_agreement:
        problems.append(f"top-1 agreement {par.top1_agreement:.4f} < export.min_top1_agreement "
                        f"{export.min_top1_agreement}")
    if par.max_abs_logit_diff > export.max_logit_diff:
        problems.append(f"max logit difference {par.max_abs_logit_diff:.2e} > export.max_logit_diff "
                        f"{export.max_logit_diff}")
    problems += [f"ONNX gate {g.name} ({g.detail})" for g in report.failed()]
    tags = {"defectops.onnx_top1_agreement": f"{par.top1_agreement:.6f}",
            "defectops.onnx_max_logit_diff": f"{par.max_abs_logit_diff:.3e}",
            "defectops.onnx_gates_passed": str(report.passed).lower(),
            "defectops.export_verified": str(not problems).lower()}
    for k, v in tags.items():
        c.set_model_version_tag(registry.model_name, version, k, v)
    c.log_artifact(rid, str(ctx.path(ONNX)), "onnx")
    c.log_artifact(rid, str(ctx.path(PARITY)), "onnx")
    if problems:
        if registry.challenger_alias in reg.aliases_of(c, registry.model_name, version):
            c.delete_registered_model_alias(registry.model_name, registry.challenger_alias)
        raise StepError("exported model failed verification, challenger alias removed: " + "; ".join(problems))
    int8 = None
    if export.int8.enabled and ctx.path(ONNX_INT8).is_file():
        int8 = _verify_int8(ctx, data, export, gates, detect, x, y, ref, crops.classes, champion, units)
        for k, v in {"defectops.int8_published": str(int8["publish"]).lower(),
                     "defectops.int8_macro_recall_drop": f"{int8['macro_recall_drop']:.6f}",
                     "defectops.int8_refused": "; ".join(int8["reasons"]) or "none"}.items():
            c.set_model_version_tag(registry.model_name, version, k, v[:5000])
        c.log_artifact(rid, str(ctx.path(INT8_REPORT)), "onnx")
        if int8["publish"]:
            c.log_artifact(rid, str(ctx.path(ONNX_INT8)), "onnx")
        else:
            ctx.reporter.log("INT8 model not published: " + "; ".join(int8["reasons"]))
    served = ctx.path(ONNX)
    if export.serve == "int8":
        if int8 and int8["publish"]:
            served = ctx.path(ONNX_INT8)
        else:
            ctx.reporter.log("export.serve=int8 but the INT8 model was not verified: serving FP32")
    precision = "int8" if served == ctx.path(ONNX_INT8) else "fp32"
    c.set_model_version_tag(registry.model_name, version, SERVED_TAG, precision)
    size = int(x.shape[1])
    model_dir = write_repository(ctx.path(TRITON), registry.model_name, served, crops.classes,
                                 (3, size, size), export.triton, version=int(version))
    result = {"parity": par.to_dict(), "onnx_macro_recall": metrics.macro_recall, "triton_model": str(model_dir),
              "served": precision}
    if int8:
        result["int8"] = {k: int8[k] for k in ("publish", "macro_recall", "macro_recall_drop", "top1_agreement",
                                               "reasons")}
    if board and "test" in board:
        result["onnx_board"] = {k: board["test"][k] for k in ("map", "fscore", "images_per_s")}
    return result


def _verify_int8(ctx: StepContext, data: DataConfig, export: ExportConfig, gates: GateConfig, detect: DetectConfig,
                 x: np.ndarray, y: np.ndarray, ref_logits: np.ndarray, classes: tuple[str, ...],
                 champion: ClassificationMetrics | None, units: list[str] | None = None) -> dict[str, Any]:
    """Evaluate the INT8 model like the checkpoint (same crops, same gates, board-level too) and decide whether it may
    be published (:func:`serving.quantize.int8_verdict`); writes ``export/int8.json``."""
    from defectops.serving.onnx_export import onnx_logits, onnx_session, parity
    from defectops.serving.quantize import int8_verdict
    from defectops.training.data import to_tensor
    from defectops.training.engine import softmax

    session = onnx_session(ctx.path(ONNX_INT8))
    logits = onnx_logits(session, to_tensor(x).numpy())
    par = parity(ref_logits, logits)
    metrics = classification_metrics(y, softmax(logits), classes, data.good_class)
    board = None
    if ctx.path(DETECTOR).is_file():
        chosen = read_json(ctx.path(DETECTOR))
        board = board_evaluation(ctx, data, detect, classes, lambda b: onnx_logits(session, b),
                                 chosen["score_threshold"], gates.confidence, chosen.get("type_thresholds"))
    report = evaluate_gates(metrics, gates, champion=champion, board=board.get("test") if board else None)
    intervals = metrics_intervals(metrics, y, logits.argmax(1), units or [f"crop:{i}" for i in range(len(y))],
                                  gates.confidence)
    reference = ClassificationMetrics.from_dict(read_json(ctx.path(METRICS)))
    verdict = int8_verdict(reference.macro_recall, metrics.macro_recall, par.top1_agreement,
                           [f"{g.name} ({g.detail})" for g in report.failed()], export.int8.max_macro_recall_drop)
    out = {**verdict.to_dict(), "macro_recall": metrics.macro_recall, "reference_macro_recall": reference.macro_recall,
           "parity": par.to_dict(), "metrics": {**metrics.to_dict(), "intervals": intervals.to_dict()},
           "gates": report.to_dict()}
    if board and "test" in board:
        out["board"] = {k: board["test"][k] for k in ("map", "fscore", "images_per_s", "intervals")}
    write_json(ctx.path(INT8_REPORT), out)
    return out


STEP_FUNCTIONS = {f.__name__: f for f in (pull_data, validate_data, train, evaluate, register, export, verify_export)}
