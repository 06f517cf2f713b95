"""Anomaly detection from good samples only (``task=anomaly``): PatchCore (:mod:`training.models.patchcore`) through the
same steps, gates, registry and export checks as the classifiers.

- **prepare**: every accepted image resized to ``anomaly.height`` x ``anomaly.width`` (PNG, lossless); labels become
  ``data.good_class`` or ``defect`` (any other class); defect polygons (``data.source=yolo_seg``) are kept for pixel
  AUROC. Defective samples of the train split move to test: the model is fitted on good samples only.
- **fit**: the memory bank from the good train images (:meth:`PatchCore.fit`), saved as tensors
  (:func:`training.models.patchcore.save_anomaly_model`, loadable with ``weights_only=True``).
- **evaluate**: image scores and anomaly maps of val and test; the threshold chosen on val
  (:func:`evaluation.anomaly.choose_threshold`), the versioned normalisation fitted on val's good scores, and the
  test split judged at that threshold as a two-class problem (``good`` / ``defect``) by the same gates and intervals as
  a classifier; image AUROC (bootstrap interval) and pixel AUROC where masks exist; a report with the score
  histogram, the ROC curve and heat maps of the worst misses and the highest-scoring good parts.
- **export**: ONNX with two outputs, ``scores`` (N x 1) and ``anomaly_map`` (N x 1 x H x W), raw: threshold and
  normalisation travel in the metadata (``defectops.anomaly``), not in the graph; with ``export.int8.enabled`` an
  INT8 copy whose backbone only is quantized (:mod:`pipelines.tasks.anomaly_int8`).
- **verify_export**: the ONNX scores on val and test against the checkpoint's (relative difference within
  ``anomaly.max_score_rel_diff``, no decision flipped) and the same gates on test, else refused with the reason; the
  INT8 copy with its own tolerances, served with ``export.serve=int8`` only where it holds (a refusal does not fail
  the step).

Board pairs (DeepPCB format, synthetic boards; ``+experiment=anomaly_boards``): the templates are the good images
(the memory bank is fitted on the train boards' templates only), the tested images of val and test boards are scored,
and anomaly-map regions become type-agnostic boxes scored by the DeepPCB rule
(:func:`pipelines.tasks.anomaly_scoring.judge_boxes`); the map threshold travels with the export.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core.fsutil import atomic_path, read_json, write_json
from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.evaluation.gates import GateConfig
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import EvaluateResult, ExportResult, TrainResult, VerifyExportResult
from defectops.pipelines.tasks.anomaly_scoring import (
    DEFECT,
    OUTPUTS,
    Judged,
    Scores,
    box_truths,
    judge,
    score_split,
    torch_scorer,
)
from defectops.pipelines.tasks.base import Prepared, ShortcutInputs, Task
from defectops.pipelines.tracking import mlflow_run
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.training.config import AnomalyConfig, DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import SPLITS, Snapshot, load_snapshot


@dataclass(frozen=True)
class AnomalyTrainResult(TrainResult):
    """The train step of an anomaly model: its memory bank and what it was chosen from."""

    bank_size: int = 0
    patches: int = 0
    embedding_dim: int = 0
    fit_images: int = 0


class AnomalyTask(Task):
    kind = TaskKind.anomaly
    model_task = "anomaly"
    prepare_label = "resizing images for the anomaly model"
    shortcut_metadata = "image files"

    def __init__(self, cfg: AnomalyConfig) -> None:
        self.cfg = cfg

    @classmethod
    def from_config(cls, *, anomaly: AnomalyConfig) -> AnomalyTask:
        return cls(anomaly)

    # ------------------------------------------------------------------------------------------------ data
    def check_snapshot(self, snap: Snapshot) -> None:
        c = self.cfg
        if min(c.height, c.width) < 32 or max(c.height, c.width) > 2048:
            raise StepError(f"anomaly.height={c.height}, anomaly.width={c.width}: use 32 to 2048 pixels")

    def prepare(self, snap: Snapshot, accepted: Sequence[int], out: Path, data: DataConfig,
                progress: Callable[[int], None]) -> Prepared:
        if is_board_snapshot(snap):
            return self._prepare_boards(snap, accepted, out, data, progress)
        from defectops.training.images import encode_png, resized_image

        if data.good_class not in snap.classes:
            raise StepError(f"data.good_class={data.good_class} is not a class of this dataset "
                            f"({', '.join(snap.classes)}): set it to the class of good parts")
        h, w = self.cfg.height, self.cfg.width
        samples: list[dict[str, Any]] = []
        moved = 0
        for i in accepted:
            s = snap.samples[i]
            data_png = encode_png(resized_image(snap.file(s["path"]), h, w,
                                                max_pixels=data.validation.max_image_pixels))
            label = data.good_class if s["label"] == data.good_class else DEFECT
            split = s["split"]
            if split == "train" and label == DEFECT:
                split, moved = "test", moved + 1
            entry = _write_image(out, f"images/{split}/{i}.png", data_png, label, split, s["path"], "image")
            entry["original_label"] = s["label"]
            for key in ("group", "polygons"):
                if s.get(key):
                    entry[key] = s[key]
            samples.append(entry)
            progress(1)
        return self._finish(out, snap, samples, data, {"defective_train_moved_to_test": moved})

    def _prepare_boards(self, snap: Snapshot, accepted: Sequence[int], out: Path, data: DataConfig,
                        progress: Callable[[int], None]) -> Prepared:
        """Board pairs: every board's **template** (the defect-free golden board) is a good image of its split, so
        the memory bank is fitted on the train boards' templates only; the **tested** images of val and test boards
        are scored (defective when they have boxes), their boxes kept (``boxes``, normalised corners, and as
        rectangles in ``polygons`` for pixel AUROC). Tested images of train boards are not used: moving them to
        test would put boards whose templates are in the memory bank among the held-out ones."""
        from defectops.training.images import encode_png, load_image
        from defectops.training.snapshot import sample_group

        h, w = self.cfg.height, self.cfg.width
        max_pixels = data.validation.max_image_pixels
        samples: list[dict[str, Any]] = []
        unused = 0
        for i in accepted:
            s = snap.samples[i]
            split = s["split"]
            board = str(s["path"]).removesuffix("_test.jpg")
            group = sample_group(s) if data.split.group_by == "design" else board
            template = load_image(snap.file(s["template"]), max_pixels=max_pixels)
            samples.append({**_write_image(out, f"images/{split}/{i}_template.png", encode_png(_resize(template, h, w)),
                                           data.good_class, split, s["template"], "template"), "group": group})
            if split == "train":
                unused += 1
            else:
                tested = load_image(snap.file(s["path"]), max_pixels=max_pixels)
                th, tw = tested.shape[:2]
                boxes = [[b[0] / tw, b[1] / th, b[2] / tw, b[3] / th, str(b[4])] for b in s.get("boxes") or ()]
                entry = _write_image(out, f"images/{split}/{i}_tested.png", encode_png(_resize(tested, h, w)),
                                     DEFECT if boxes else data.good_class, split, s["path"], "tested")
                entry.update(group=group, boxes=boxes,
                             polygons=[[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]] for b in boxes])
                samples.append(entry)
            progress(1)
        return self._finish(out, snap, samples, data, {"boards": True, "train_tested_images_unused": unused})

    def _finish(self, out: Path, snap: Snapshot, samples: list[dict[str, Any]], data: DataConfig,
                extra: dict[str, Any]) -> Prepared:
        from defectops.training.snapshot import write_snapshot

        if not any(x["split"] == "train" and x["label"] == data.good_class for x in samples):
            raise StepError(f"no good ({data.good_class}) image in the train split: the anomaly model is fitted on "
                            "good samples only")
        h, w = self.cfg.height, self.cfg.width
        crops = write_snapshot(out, samples, (data.good_class, DEFECT),
                               extra={"board_fingerprint": snap.fingerprint, "fit": {"size": [h, w], "mode": "resize"},
                                      "boards": bool(extra.get("boards"))})
        per_split = {sp: dict(Counter(x["label"] for x in samples if x["split"] == sp)) for sp in SPLITS}
        return Prepared(crops, {"images": per_split, **extra,
                                "masks": sum(1 for x in samples if x.get("polygons"))})

    def shortcut_inputs(self, snap: Snapshot, used: Sequence[dict[str, Any]]) -> ShortcutInputs:
        from defectops.evaluation.shortcut import DEFAULT_FIX
        from defectops.training.images import image_metadata

        feats, names = image_metadata([snap.file(x["source"]) for x in used])
        return ShortcutInputs(feats, names, DEFAULT_FIX)

    # ------------------------------------------------------------------------------------------------ fit
    def _batches(self, images: np.ndarray) -> Iterator[Any]:
        from defectops.training.data import to_tensor

        for i in range(0, len(images), self.cfg.batch_size):
            yield to_tensor(images[i:i + self.cfg.batch_size])

    def fit(self, ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig,
            registry: RegistryConfig, seed: int) -> AnomalyTrainResult:
        """Fit the memory bank on the good train images; write ``RUN.model``."""
        from defectops.registry import mlflow_registry as reg
        from defectops.training.data import load_split
        from defectops.training.models.patchcore import create_anomaly_model, save_anomaly_model
        from defectops.training.models.pretrained import WeightsError

        if train.nproc > 1:
            raise StepError("task=anomaly fits its memory bank in one process: set train.nproc=1")
        c = self.cfg
        crops = load_snapshot(ctx.path(RUN.crops))
        x, y, _ = load_split(crops, "train")
        good = x[y == crops.classes.index(data.good_class)]
        try:
            net = create_anomaly_model(c.model, num_neighbors=c.num_neighbors, weights=c.weights,
                                       layers=tuple(c.layers) or None)
        except (WeightsError, ValueError) as e:
            raise StepError(str(e)) from None
        client, rid = mlflow_run(ctx, registry)
        reg.log_params(client, rid, {"task": "anomaly", "model": c.model, "layers": ",".join(net.spec.layers),
                                     "input": f"{c.height}x{c.width}", "coreset_ratio": c.coreset_ratio,
                                     "max_bank": c.max_bank, "max_patches": c.max_patches,
                                     "num_neighbors": c.num_neighbors, "seed": seed,
                                     "train_samples": len(good),
                                     "pretrained_sha256": net.weights_info.get("weights_sha256", "none"),
                                     "dataset_fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint})
        advance = ctx.reporter.task(f"embedding {len(good)} good images ({c.model})", len(good))
        progress: dict[str, Callable[[int], None]] = {}

        def coreset_progress(total: int, patches: int) -> Callable[[int], None]:
            progress["coreset"] = ctx.reporter.task(f"coreset: {total} of {patches} patches", total)
            return progress["coreset"]

        stats = net.fit(self._batches(good), coreset_ratio=c.coreset_ratio, max_bank=c.max_bank, seed=seed,
                        max_patches=c.max_patches, on_batch=advance, coreset_progress=coreset_progress)
        save_anomaly_model(net, ctx.path(RUN.model), name=c.model, input_hw=(c.height, c.width),
                           classes=crops.classes, extra={"good_class": data.good_class, "fit": stats.__dict__})
        reg.log_params(client, rid, {"bank_size": stats.bank_size, "patches": stats.patches})
        ctx.reporter.log(f"memory bank: {stats.bank_size} of {stats.patches} patches x {stats.embedding_dim}")
        return AnomalyTrainResult(1, 0, mlflow_run_id=rid, pretrained=net.weights_info or None,
                                  class_counts={data.good_class: len(good)}, bank_size=stats.bank_size,
                                  patches=stats.patches, embedding_dim=stats.embedding_dim, fit_images=stats.images)

    # ------------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, ctx: StepContext, data: DataConfig, gates: GateConfig, registry: RegistryConfig,
                 detect: DetectConfig) -> EvaluateResult:
        net, state = self._load(ctx)
        crops = load_snapshot(ctx.path(RUN.crops))
        val = score_split(crops, "val", torch_scorer(net), self.cfg)
        test = score_split(crops, "test", torch_scorer(net), self.cfg)
        if len(test.labels) == 0:
            raise StepError("the test split has no images: raise data.split.test")
        champion, champion_version = self._champion(ctx, registry, crops, test, data.good_class)
        if champion is not None:
            write_json(ctx.path(RUN.champion_metrics), champion.to_dict())
        judged = judge(val, test, crops, self.cfg, data.good_class, gates, champion)
        with atomic_path(ctx.path(RUN.predictions)) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, logits=judged.logits, labels=test.labels, paths=np.asarray(test.paths),
                                scores=test.scores, val_scores=val.scores, val_labels=val.labels)
        write_json(ctx.path(RUN.metrics), {**judged.scored.metrics_doc(), "anomaly": judged.doc})
        write_json(ctx.path(RUN.gates), judged.scored.gates.to_dict())
        write_json(ctx.path(RUN.anomaly), judged.doc)
        _write_report(ctx, crops, state, val, test, judged, data.good_class, champion_version)
        scored = judged.scored
        return EvaluateResult(scored.gates.passed, [g.name for g in scored.gates.failed()],
                              scored.metrics.macro_recall, champion_version, None)

    def _champion(self, ctx: StepContext, registry: RegistryConfig, crops: Snapshot, test: Scores,
                  good_class: str) -> tuple[Any, str]:
        """The champion scored on this run's test images at its own threshold and normalisation (its registered
        ``metrics.json``): a like-for-like baseline for the no-regression gates. Only an anomaly champion with the
        same input size is comparable."""
        import tempfile

        import mlflow.artifacts

        from defectops.evaluation.anomaly import ScoreNormalization, anomaly_probabilities
        from defectops.evaluation.metrics import classification_metrics
        from defectops.pipelines.tracking import registry_client
        from defectops.registry import mlflow_registry as reg
        from defectops.training.models.model_format import load_registered_model

        c, _ = registry_client(ctx, registry)
        mv = reg.alias_version(c, registry.model_name, registry.champion_alias)
        if mv is None:
            return None, "none (no champion yet)"
        label = f"version {mv.version}"
        params = c.get_run(mv.run_id).data.params
        if params.get("task") != "anomaly":
            return None, f"{label} is not an anomaly model: not comparable"
        if params.get("input") != f"{self.cfg.height}x{self.cfg.width}":
            return None, f"{label} takes {params.get('input')} images, this run {self.cfg.height}x{self.cfg.width}: " \
                         "not comparable"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                doc = json.loads(Path(mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id, artifact_path="metrics.json", dst_path=tmp,
                    tracking_uri=c.tracking_uri)).read_text())["anomaly"]
                net = load_registered_model(c.get_model_version_download_uri(registry.model_name, str(mv.version)),
                                            tracking_uri=c.tracking_uri)
            scores = score_split(crops, "test", torch_scorer(net), self.cfg).scores
            probs = anomaly_probabilities(scores, ScoreNormalization.from_dict(doc["normalization"]))
        except Exception as e:  # noqa: BLE001 - an unloadable champion is reported; the regression gates are skipped
            return None, f"{label} could not be evaluated ({type(e).__name__}: {str(e)[:120]})"
        return classification_metrics(test.labels, probs, crops.classes, good_class), label

    def _load(self, ctx: StepContext) -> tuple[Any, dict[str, Any]]:
        from defectops.training.models.patchcore import load_anomaly_model

        try:
            return load_anomaly_model(ctx.path(RUN.model))
        except (FileNotFoundError, ValueError) as e:
            raise StepError(str(e)) from None

    # ------------------------------------------------------------------------------------------------ register
    def save_model(self, ctx: StepContext, out: Path) -> None:
        """The registered format (:mod:`training.models.model_format`): ``RUN.model``'s tensors-only PatchCore file and
        a JSON of the registry name and constructor kwargs; loading it runs no code from the artifact store."""
        from defectops.training.models.model_format import save_registered_anomaly

        net, state = self._load(ctx)
        hw = state["input_hw"]
        save_registered_anomaly(net, out, model_name=str(state["model_name"]), input_hw=(int(hw[0]), int(hw[1])),
                                classes=[str(c) for c in state["classes"]], extra=state.get("extra") or {})

    def drift_reference(self, ctx: StepContext, data: DataConfig, out: Path) -> None:
        """Image statistics, mean patch embeddings and decision probabilities of the held-out (val + test) **good**
        images: production is mostly good parts, so a batch of them should look like this, and a rise of flagged
        parts shows as a shift of the prediction mix. The meta carries the score normalisation, so a drift check
        decides like the model."""
        from defectops.evaluation.anomaly import ScoreNormalization
        from defectops.evaluation.drift_profile import profile_from_anomaly_model, reduce_reference, save_profile
        from defectops.training.data import load_split

        net, state = self._load(ctx)
        crops = load_snapshot(ctx.path(RUN.crops))
        good = crops.classes.index(data.good_class)
        parts = [(x[y == good], y[y == good]) for x, y, _ in (load_split(crops, sp) for sp in ("val", "test"))]
        parts = [p for p in parts if len(p[1])]
        if not parts:
            raise StepError("no held-out good images to profile for drift checks: the val and test splits have none")
        normalization = read_json(ctx.path(RUN.anomaly))["normalization"]
        profile = profile_from_anomaly_model(net, np.concatenate([p[0] for p in parts]), crops.classes,
                                             ScoreNormalization.from_dict(normalization),
                                             labels=np.concatenate([p[1] for p in parts]),
                                             batch_size=self.cfg.batch_size)
        save_profile(out, reduce_reference(profile), {
            "run_id": ctx.run_id, "model_name": state["model_name"], "task": self.model_task,
            "good_class": data.good_class, "input_size": state["input_hw"], "fit_mode": "resize",
            "normalization": normalization, "splits": ["val", "test"], "labels": [data.good_class],
            "dataset_fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint,
            "crops_fingerprint": crops.fingerprint, "data": {"source": data.source, "root": data.root or ""}})

    # ------------------------------------------------------------------------------------------------ export
    def export(self, ctx: StepContext, export: ExportConfig, data: DataConfig) -> ExportResult:
        """ONNX with raw ``scores`` (N x 1) and ``anomaly_map`` (N x 1 x H x W); threshold and normalisation in the
        metadata."""
        from defectops.serving.model_ref import model_metadata
        from defectops.serving.onnx_export import export_onnx
        from defectops.training.models.patchcore import PatchCoreExport

        net, state = self._load(ctx)
        h, w = state["input_hw"]
        judged = read_json(ctx.path(RUN.anomaly))
        fingerprint = read_json(ctx.path(RUN.crops) / "snapshot.json").get("board_fingerprint", "")
        anomaly = {"threshold": judged["threshold"]["value"], "normalization": judged["normalization"],
                   "model": state["model_name"], "layers": state["layers"],
                   "backbone_sha256": (state.get("weights_info") or {}).get("weights_sha256")}
        boxes = judged.get("boxes") or {}
        if "map_threshold" in boxes:  # board pairs: what turns a map into boxes
            anomaly["boxes"] = {"map_threshold": boxes["map_threshold"]["value"], "min_area": boxes["min_area"]}
        meta = model_metadata(list(state["classes"]), data.good_class, int(h), self.model_task, fit_mode="resize",
                              extra={"run_id": ctx.run_id, "dataset_fingerprint": fingerprint,
                                     "input_hw": json.dumps([h, w]), "anomaly": json.dumps(anomaly)})
        export_onnx(PatchCoreExport(net), ctx.path(RUN.onnx), input_shape=(3, int(h), int(w)), opset=export.opset,
                    metadata=meta, output_names=OUTPUTS)
        int8 = None
        if export.int8.enabled:  # the backbone only: the nearest-neighbour part stays FP32
            from defectops.pipelines.tasks.anomaly_int8 import export_anomaly_int8

            int8 = export_anomaly_int8(ctx, export, data.good_class)
        return ExportResult(str(ctx.path(RUN.onnx)), export.opset, ctx.path(RUN.onnx).stat().st_size, int8)

    def verify_export(self, ctx: StepContext, data: DataConfig, export: ExportConfig, gates: GateConfig,
                      registry: RegistryConfig, detect: DetectConfig) -> VerifyExportResult:
        from defectops.pipelines.tasks.anomaly_verify import verify_anomaly_export

        return verify_anomaly_export(self.cfg, ctx, data, export, gates, registry)


# ---------------------------------------------------------------------------------------------------- helpers
def _write_report(ctx: StepContext, crops: Snapshot, state: dict[str, Any], val: Scores, test: Scores,
                  judged: Judged, good_class: str, champion_version: str) -> None:
    """``RUN.report`` (metrics, gates, the anomaly section, heat maps) and ``RUN.misses`` (the same tiles)."""
    from defectops.evaluation.anomaly_report import anomaly_section, heatmap_tiles
    from defectops.evaluation.metrics import pr_curves
    from defectops.evaluation.report import render_report, write_miss_tiles
    from defectops.evaluation.report_sections import read_shortcut, read_validation, split_note

    good = crops.classes.index(good_class)
    threshold = float(judged.doc["threshold"]["value"])
    tiles = heatmap_tiles(test.images, test.maps, test.labels != good, test.scores, threshold, crops.classes,
                          boxes=_tile_boxes(crops, test, judged.doc.get("boxes") or {}))
    write_miss_tiles(ctx.path(RUN.misses), tiles)
    scored = judged.scored
    fit = (state.get("extra") or {}).get("fit") or {}
    info = {"run id": ctx.run_id, "model": f"{state['model_name']} ({', '.join(state['layers'])})",
            "input": "x".join(map(str, state["input_hw"])), "memory bank": f"{fit.get('bank_size')} of "
            f"{fit.get('patches')} patches", "backbone sha256": str((state.get("weights_info") or {})
                                                                    .get("weights_sha256", ""))[:16],
            "dataset fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint[:16],
            "test images": str(len(test.labels)), "champion compared": champion_version}
    section = anomaly_section((val.labels != good, val.scores), (test.labels != good, test.scores), judged.doc)
    render_report(ctx.path(RUN.report), title=f"DefectOps anomaly evaluation: {ctx.run_id}", metrics=scored.metrics,
                  gates=scored.gates, curves=pr_curves(test.labels, scored.probs, crops.classes), info=info,
                  misses=tiles, sections=[("Anomaly scores, threshold and AUROC", section)],
                  intervals=scored.intervals, split_note=split_note(len(test.labels), scored.intervals),
                  shortcut=read_shortcut(ctx.path(RUN.shortcut)), quarantine=read_validation(ctx.path(RUN.validation)))


def _tile_boxes(crops: Snapshot, test: Scores, boxes: dict[str, Any]) -> list[tuple[list[Any], list[Any]]] | None:
    """Board pairs: per test image, its annotated boxes and the boxes from its map (map pixels = image pixels)."""
    from defectops.evaluation.anomaly_boxes import map_detections

    if "map_threshold" not in boxes:
        return None
    t, area = float(boxes["map_threshold"]["value"]), int(boxes["min_area"])
    return [(truth or [], [d.box for d in map_detections(m, t, min_area=area)])
            for truth, m in zip(box_truths(crops, test), test.maps, strict=True)]


def is_board_snapshot(snap: Snapshot) -> bool:
    """Board pairs (a template beside each tested image: DeepPCB format, the synthetic generator)."""
    return any("template" in x for x in snap.samples)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """The whole image resized as :func:`training.images.resized_image` does (area filter)."""
    import cv2

    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _write_image(out: Path, rel: str, png: bytes, label: str, split: str, source: str, origin: str) -> dict[str, Any]:
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(png)
    return {"path": rel, "sha256": hashlib.sha256(png).hexdigest(), "label": label, "split": split, "source": source,
            "origin": origin}
