"""Drift profiles on disk, and computing a profile with a model.

A reference profile is two files in one folder (``drift/`` of a run root and of the model version's MLflow run):

* ``reference.npz``: ``features`` (N, 12) float32 image statistics, ``histograms`` (N, C, 16) float16,
  ``embeddings`` (M <= 512, D) float16, ``probs`` (N, K) float16, ``labels`` (N,) int16;
* ``reference.json``: what the profile belongs to (model, classes, task, input size, fit mode, dataset fingerprint
  and source, rows) and a readable summary (class priors, prediction mix, mean confidence).

N is at most 2,000 held-out crops, so a profile stays well under a megabyte.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectops.evaluation.anomaly import ScoreNormalization
from defectops.evaluation.drift import Profile, channel_names, subsample

REFERENCE_NPZ = "reference.npz"
REFERENCE_JSON = "reference.json"
MAX_REFERENCE_ROWS = 2000
MAX_EMBEDDING_ROWS = 512
FORMAT_VERSION = 1


def profile_from_images(net: Any, images: np.ndarray, classes: Sequence[str], task: str, *,
                        labels: np.ndarray | None = None, max_embedding_rows: int | None = None,
                        seed: int = 0, batch_size: int = 256) -> Profile:
    """The profile of ``images`` (N, H, W, 3) uint8 seen through ``net`` (a DefectOps classifier, on CPU)."""
    from defectops.evaluation.drift import image_stats
    from defectops.training.data import to_tensor
    from defectops.training.engine import softmax
    from defectops.training.models.embeddings import embed

    feats, hist = image_stats(images)
    emb, logits = embed(net, to_tensor(images), batch_size=batch_size)
    probs = softmax(logits) if len(logits) else np.zeros((0, len(classes)), np.float32)
    if max_embedding_rows is not None:
        emb = emb[subsample(len(emb), max_embedding_rows, seed)]
    return Profile(features=feats, histograms=hist, embeddings=emb, probs=probs.astype(np.float32),
                   classes=tuple(classes), channels=channel_names(task, images.shape[-1]), labels=labels)


def profile_from_anomaly_model(net: Any, images: np.ndarray, classes: Sequence[str], norm: ScoreNormalization, *,
                                labels: np.ndarray | None = None, batch_size: int = 8) -> Profile:
    """The profile of ``images`` (N, H, W, 3) uint8 seen through an anomaly model (``task=anomaly``): image statistics,
    the mean patch embedding of each image, and the decision probabilities at the model's threshold."""
    import torch

    from defectops.evaluation.anomaly import anomaly_probabilities
    from defectops.evaluation.drift import image_stats
    from defectops.training.data import to_tensor

    feats, hist = image_stats(images)
    embs, scores = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i:i + batch_size])
            emb, (fh, fw) = net.embed(x)
            embs.append(emb.reshape(len(x), fh * fw, -1).mean(1).numpy())
            scores.append(net(x)[0].numpy())
    emb_all = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
    probs = anomaly_probabilities(np.concatenate(scores), norm) if scores else np.zeros((0, len(classes)))
    return Profile(features=feats, histograms=hist, embeddings=emb_all, probs=probs.astype(np.float32),
                   classes=tuple(classes), channels=channel_names("anomaly", images.shape[-1]), labels=labels)


def reduce_reference(profile: Profile, seed: int = 0) -> Profile:
    """At most :data:`MAX_REFERENCE_ROWS` rows and :data:`MAX_EMBEDDING_ROWS` embeddings (seeded subsample)."""
    idx = subsample(profile.size, MAX_REFERENCE_ROWS, seed)
    emb = profile.embeddings[idx] if len(profile.embeddings) == profile.size else profile.embeddings
    emb = emb[subsample(len(emb), MAX_EMBEDDING_ROWS, seed + 1)]
    return Profile(profile.features[idx], profile.histograms[idx], emb, profile.probs[idx], profile.classes,
                   profile.channels, None if profile.labels is None else profile.labels[idx])


def summary(profile: Profile) -> dict[str, Any]:
    counts = profile.prediction_counts()
    return {"rows": profile.size, "embedding_rows": len(profile.embeddings),
            "embedding_dim": int(profile.embeddings.shape[1]) if profile.embeddings.ndim == 2 else 0,
            "class_priors": profile.priors(),
            "prediction_mix": {c: float(v) / max(int(counts.sum()), 1)
                               for c, v in zip(profile.classes, counts, strict=True)},
            "mean_confidence": float(profile.confidence.mean()) if profile.size else None,
            "feature_means": {n: float(v) for n, v in zip(profile.feature_names, profile.features.mean(0),
                                                          strict=True)} if profile.size else {}}


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_profile(directory: Path, profile: Profile, meta: dict[str, Any]) -> Path:
    """Write ``reference.npz`` then ``reference.json`` (the JSON last: its presence marks a complete profile)."""
    directory = Path(directory)
    buf = io.BytesIO()
    labels = profile.labels if profile.labels is not None else np.full(profile.size, -1)
    np.savez_compressed(buf, features=profile.features.astype(np.float32),
                        histograms=profile.histograms.astype(np.float16),
                        embeddings=profile.embeddings.astype(np.float16), probs=profile.probs.astype(np.float16),
                        labels=labels.astype(np.int16))
    _atomic_bytes(directory / REFERENCE_NPZ, buf.getvalue())
    doc = {"format": FORMAT_VERSION, **meta, "classes": list(profile.classes), "channels": list(profile.channels),
           "feature_names": list(profile.feature_names), "summary": summary(profile)}
    _atomic_bytes(directory / REFERENCE_JSON, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return directory


def load_profile(directory: Path) -> tuple[Profile, dict[str, Any]]:
    """The profile in ``directory`` and its ``reference.json``; FileNotFoundError / ValueError when unusable."""
    directory = Path(directory)
    meta_file, npz_file = directory / REFERENCE_JSON, directory / REFERENCE_NPZ
    if not meta_file.is_file() or not npz_file.is_file():
        raise FileNotFoundError(f"no drift reference profile in {directory} ({REFERENCE_JSON} + {REFERENCE_NPZ})")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if int(meta.get("format", 0)) != FORMAT_VERSION:
        raise ValueError(f"{meta_file} has format {meta.get('format')}, this DefectOps reads {FORMAT_VERSION}")
    with np.load(npz_file) as z:
        labels = z["labels"].astype(np.int64)
        profile = Profile(features=z["features"].astype(np.float32), histograms=z["histograms"].astype(np.float32),
                          embeddings=z["embeddings"].astype(np.float32), probs=z["probs"].astype(np.float32),
                          classes=tuple(meta["classes"]), channels=tuple(meta["channels"]),
                          labels=None if (labels < 0).all() else labels)
    return profile, meta
