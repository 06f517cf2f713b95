"""Batch prediction with an exported model: DeepPCB-format board lists and folders of images.

``predict_boards`` writes one DeepPCB result file per image (``x1,y1,x2,y2,confidence,name`` by descending
confidence); ``predict_images`` writes one CSV row per image. Both take a :class:`ResolvedModel` (see
``defectops.serving.model_ref``) so preprocessing is exactly what the model was trained and verified with.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core.fsutil import write_text
from defectops.evaluation.deeppcb import DeepPCBScore, GroundTruth, format_result_lines, score
from defectops.serving.detector import BoardDetector, DetectorSettings, detections_from_probs
from defectops.serving.model_ref import ResolvedModel
from defectops.serving.onnx_export import onnx_logits, onnx_session
from defectops.training.engine import softmax


@dataclass(frozen=True)
class BoardPrediction:
    images: int
    detections: int
    seconds: float
    images_per_s: float
    score: DeepPCBScore | None


def read_board_list(root: Path, list_file: Path) -> tuple[list[tuple[str, Path, Path]], list[Path | None]]:
    """Pairs ``(stem, template, tested)`` and annotation paths (``None`` when absent) of a DeepPCB list file."""
    if not list_file.is_file():
        raise FileNotFoundError(f"list file {list_file} not found")
    pairs, anns = [], []
    for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        stem = parts[0].removesuffix(".jpg")
        template, tested = root / f"{stem}_temp.jpg", root / f"{stem}_test.jpg"
        for p in (template, tested):
            if not p.is_file():
                raise FileNotFoundError(f"{p} (line {n} of {list_file}) not found: is --input the folder the list "
                                        f"is relative to?")
        pairs.append((Path(stem).name, template, tested))
        ann = root / parts[1] if len(parts) > 1 else None
        anns.append(ann if ann is not None and ann.is_file() else None)
    if not pairs:
        raise ValueError(f"{list_file} lists no image pairs")
    return pairs, anns


def detector_for(model: ResolvedModel, threads: int = 2) -> BoardDetector:
    if model.task != "aoi":
        raise ValueError(f"{model.source} classifies whole images (task {model.task!r}): use `predict images`")
    d = model.detector
    settings = DetectorSettings(classes=model.classes, good_class=model.good_class, crop_size=model.input_size,
                                context=float(d.get("context", 2.0)), candidates=dict(d.get("candidates", {})),
                                score_threshold=float(d.get("score_threshold", 0.5)),
                                type_thresholds={k: float(v) for k, v in d.get("type_thresholds", {}).items()},
                                box_margin=int(d.get("box_margin", 6)), merge=bool(d.get("merge", True)),
                                confidence=str(d.get("confidence", "label")))
    session = onnx_session(model.onnx_path, threads=threads, spinning=False)  # the candidate threads need the cores
    return BoardDetector(lambda x: onnx_logits(session, x), settings, threads=threads)


def predict_boards(model: ResolvedModel, root: Path, list_file: Path, out: Path, *, threads: int = 2,
                   progress: Callable[[int], None] | None = None) -> BoardPrediction:
    """Detect defects on every listed pair and write ``out/<stem>.txt``; score against annotations when all exist."""
    pairs, anns = read_board_list(root, list_file)
    detector = detector_for(model, threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for r in detector.run(pairs):
        dets = detections_from_probs(r.candidates, r.probs, detector.s, r.shape)
        results[r.key] = dets
        if progress:
            progress(1)
    seconds = time.perf_counter() - t0
    for key, dets in results.items():
        write_text(out / f"{key}.txt", format_result_lines(dets))
    sc = None
    if all(a is not None for a in anns):
        from defectops.training.candidates import read_deeppcb_annotations

        gts = {key: [GroundTruth(b.x1, b.y1, b.x2, b.y2, b.label) for b in read_deeppcb_annotations(a)]
               for (key, _, _), a in zip(pairs, anns, strict=True) if a is not None}
        sc = score({k: (gts[k], results[k]) for k in results})
    n_det = sum(len(d) for d in results.values())
    return BoardPrediction(len(pairs), n_det, seconds, len(pairs) / max(seconds, 1e-9), sc)


def predict_images(model: ResolvedModel, paths: Sequence[Path], out_csv: Path, *, batch_size: int = 64,
                   threads: int = 2, progress: Callable[[int], None] | None = None) -> tuple[int, float]:
    """Classify images with the same preprocessing as training; one CSV row per image. Returns (rows, images/s)."""
    from defectops.training.images import preprocess_for_model

    session = onnx_session(model.onnx_path, threads=threads)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "predicted", "confidence", *[f"p_{c}" for c in model.classes]])
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        chunk = list(paths[i:i + batch_size])
        x = preprocess_for_model(chunk, model.input_size, model.fit_mode)
        probs = softmax(onnx_logits(session, x))
        for p, row in zip(chunk, probs, strict=True):
            k = int(row.argmax())
            writer.writerow([str(p), model.classes[k], f"{row[k]:.6f}", *[f"{v:.6f}" for v in row]])
        if progress:
            progress(len(chunk))
    seconds = time.perf_counter() - t0
    write_text(out_csv, buf.getvalue())
    return len(paths), len(paths) / max(seconds, 1e-9)


def map_boxes_json(amap: np.ndarray, path: Path, rule: dict[str, Any]) -> str:
    """The boxes of one anomaly map (``H x W``, the model's input) at a board model's map threshold (``rule``: its
    metadata's ``boxes``), as JSON ``[[x1, y1, x2, y2, confidence], ...]`` in the pixels of the image at ``path``."""
    from defectops.evaluation.anomaly_boxes import map_detections
    from defectops.training.images import image_size

    iw, ih = image_size(path)
    h, w = amap.shape[-2:]
    dets = map_detections(amap, float(rule["map_threshold"]), min_area=int(rule["min_area"]), scale=(iw / w, ih / h))
    return json.dumps([[round(d.x1, 1), round(d.y1, 1), round(d.x2, 1), round(d.y2, 1), round(d.confidence, 4)]
                       for d in dets])


def predict_anomaly(model: ResolvedModel, paths: Sequence[Path], out_csv: Path, *, maps_dir: Path | None = None,
                    batch_size: int = 16, threads: int = 2,
                    progress: Callable[[int], None] | None = None) -> tuple[int, float]:
    """Score images with an anomaly model (``task=anomaly``), preprocessed as in training (whole image resized).

    One CSV row per image: ``path, decision, score, normalised, p_defect`` (the decision at the model's threshold,
    the score raw and normalised as its metadata says); a model of board pairs adds ``boxes``: a JSON list of
    ``[x1, y1, x2, y2, confidence]`` in the image's pixels, the regions of the map above its map threshold
    (:func:`evaluation.anomaly_boxes.map_detections`, type-agnostic). With ``maps_dir``: per image
    ``<n>-<stem>.npy`` (the raw anomaly map, float32, at input resolution) and ``<n>-<stem>.png`` (the map over the
    image, one colour scale: 0 to twice the threshold). Returns (rows, images/s).
    """
    from defectops.evaluation.anomaly import ScoreNormalization, anomaly_probabilities
    from defectops.evaluation.gradcam import overlay
    from defectops.serving.onnx_export import ANOMALY_OUTPUTS
    from defectops.training.images import encode_png, resized_image

    if model.task != "anomaly" or model.input_hw is None or not model.anomaly:
        raise ValueError(f"{model.source} is not an anomaly model (task {model.task}): use predict_images")
    h, w = model.input_hw
    threshold = float(model.anomaly["threshold"])
    norm = ScoreNormalization.from_dict(model.anomaly["normalization"])
    good = model.good_class
    bad = next(c for c in model.classes if c != good)
    session = onnx_session(model.onnx_path, threads=threads)
    buf = io.StringIO()
    writer = csv.writer(buf)
    box_rule = model.anomaly.get("boxes") or {}
    writer.writerow(["path", "decision", "score", "normalised", "p_defect", *(["boxes"] if box_rule else [])])
    staged: list[tuple[str, bytes]] = []
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        chunk = list(paths[i:i + batch_size])
        images = np.stack([resized_image(p, h, w) for p in chunk])
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        scores, maps = session.run(list(ANOMALY_OUTPUTS), {"images": x})
        scores = np.asarray(scores, np.float64).reshape(-1)
        probs = anomaly_probabilities(scores, norm)
        for k, (p, s) in enumerate(zip(chunk, scores, strict=True)):
            row = [str(p), bad if s >= threshold else good, f"{s:.6f}", f"{norm.normalise(np.array([s]))[0]:.6f}",
                   f"{probs[k, 1]:.6f}"]
            if box_rule:
                row.append(map_boxes_json(maps[k, 0], p, box_rule))
            writer.writerow(row)
            if maps_dir is not None:
                stem = f"{i + k:06d}-{p.stem}"
                m = np.asarray(maps[k, 0], np.float32)
                npy = io.BytesIO()
                np.save(npy, m)
                staged.append((f"{stem}.npy", npy.getvalue()))
                heat = overlay(images[k], np.clip(m / (2 * threshold), 0, 1)) if threshold > 0 else images[k]
                staged.append((f"{stem}.png", encode_png(heat)))
        if progress:
            progress(len(chunk))
    seconds = time.perf_counter() - t0
    if maps_dir is not None:
        from defectops.core.fsutil import atomic_dir

        with atomic_dir(maps_dir) as tmp:
            for name, data in staged:
                (tmp / name).write_bytes(data)
    write_text(out_csv, buf.getvalue())
    return len(paths), len(paths) / max(seconds, 1e-9)
