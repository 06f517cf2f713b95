"""Drift-check glue between the registry, image batches and ``defectops drift check`` (pure test: ``evaluation.drift``).

The register step writes the reference profile (``drift/reference.{npz,json}`` of the run root, logged under
``drift/`` of the version's run; :mod:`pipelines.steps.register`).
* :func:`load_checked_model`: a ``models:/name@alias`` / ``models:/name/<version>`` reference or a run root ->
  the PyTorch model (the version's ``model`` artifact, read without unpickling by
  :func:`training.models.model_format.load_registered_model`: the ONNX export only outputs logits, and the
  embeddings need the penultimate layer) and its reference profile.
* :func:`load_batch`: a folder of images (crops for AOI models) or ``s3://bucket/prefix`` -> uint8 pixels
  preprocessed exactly as the model was trained.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core import tags as T
from defectops.core.layout import RUN
from defectops.evaluation.drift import Profile
from defectops.evaluation.drift_profile import (
    REFERENCE_JSON,
    load_profile,
    profile_from_images,
)

DRIFT = RUN.drift
MAX_BATCH_DEFAULT = 5000


class DriftUsageError(ValueError):
    """Bad input to the check (exit code 2)."""


class DriftFailure(RuntimeError):
    """The check could not be carried out (exit code 1)."""


# --------------------------------------------------------------------------------------------------- model
@dataclass
class CheckedModel:
    net: Any
    reference: Profile
    meta: dict[str, Any]
    source: str
    version: dict[str, str] = field(default_factory=dict)  # name, version, run_id, dataset fingerprint


def load_checked_model(ref: str, *, tracking_uri: str, cache_dir: Path, allow_pickle: bool | None = None
                       ) -> CheckedModel:
    """The model and reference profile behind ``ref`` (``models:/...`` or a run root). A registry version is read by
    :func:`training.models.model_format.load_registered_model`: a pickled one only with ``allow_pickle``
    (``--allow-pickle``; default ``DEFECTOPS_ALLOW_PICKLE=1``)."""
    from defectops.serving.model_ref import ModelRefError, parse_registry_ref

    try:
        parsed = parse_registry_ref(ref)
    except ModelRefError as e:
        raise DriftUsageError(str(e)) from None
    if parsed:
        return _from_registry(*parsed, tracking_uri, cache_dir, ref, allow_pickle)
    root = Path(ref).expanduser()
    if not root.is_dir():
        raise DriftUsageError(f"--model {ref!r} is neither models:/name@alias nor a run root")
    from defectops.training.trainer import load_trained_model

    try:
        reference, meta = load_profile(root / DRIFT)
    except FileNotFoundError:
        raise DriftUsageError(f"run root {root} has no {DRIFT}/{REFERENCE_JSON}: run its register step (it writes "
                              f"the reference profile)") from None
    except ValueError as e:
        raise DriftFailure(str(e)) from None
    net: Any
    if meta.get("task") == "anomaly":
        from defectops.training.models.patchcore import load_anomaly_model

        net, _ = load_anomaly_model(root / RUN.model)
    else:
        net, _ = load_trained_model(root / RUN.model)
    return CheckedModel(net, reference, meta, str(root), {"run_root": str(root)})


def _from_registry(name: str, alias: str | None, version: str | None, tracking_uri: str, cache_dir: Path,
                   ref: str, allow_pickle: bool | None) -> CheckedModel:
    from mlflow.exceptions import MlflowException

    from defectops.serving.model_ref import ModelRefError, cache_folder, registry_version
    from defectops.training.models.model_format import load_registered_model

    try:
        c, mv = registry_version(name, alias, version, tracking_uri, ref)
    except ModelRefError as e:
        raise DriftUsageError(str(e)) from None
    dest = cache_folder(cache_dir, "drift", tracking_uri, name, str(mv.version))
    try:
        if not (dest / "reference" / REFERENCE_JSON).is_file():
            from defectops.core.fsutil import atomic_dir

            with atomic_dir(dest) as tmp:
                try:
                    c.download_artifacts(mv.run_id, DRIFT, str(tmp))
                except MlflowException:
                    raise DriftUsageError(f"{ref} (version {mv.version}) has no drift reference profile (artifact "
                                          f"{DRIFT}/ of its run): it was registered before drift profiles existed; "
                                          f"retrain it or check a newer version") from None
                (tmp / DRIFT).rename(tmp / "reference")
                c.download_artifacts(mv.run_id, "model", str(tmp))
        reference, meta = load_profile(dest / "reference")
        net = load_registered_model(dest / "model", allow_pickle=allow_pickle)
    except DriftUsageError:
        raise
    except (FileNotFoundError, ValueError) as e:  # ValueError: also a pickled version without --allow-pickle
        raise DriftUsageError(f"{ref} (version {mv.version}): {e}") from None
    except Exception as e:  # noqa: BLE001 - unreachable store, broken artifact: the check cannot run
        raise DriftFailure(f"could not load {ref} (version {mv.version}): {type(e).__name__}: {str(e)[:200]}") \
            from None
    info = {"name": name, "version": str(mv.version), "run_id": str(mv.run_id),
            "dataset_fingerprint": mv.tags.get(T.DATASET_FINGERPRINT, "")}
    return CheckedModel(net, reference, meta, f"{ref} (version {mv.version})", info)


# --------------------------------------------------------------------------------------------------- batch
def _download_s3(uri: str, dest: Path, max_images: int) -> list[Path]:
    from defectops.training.importers import IMAGE_EXTENSIONS
    from defectops.training.remote import parse_s3_uri, s3_client

    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as e:
        raise DriftUsageError(str(e)) from None
    s3 = s3_client()
    keys: list[str] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"
                                                                 if prefix else ""):
            keys += [o["Key"] for o in page.get("Contents", []) if Path(o["Key"]).suffix.lower() in IMAGE_EXTENSIONS]
    except Exception as e:  # noqa: BLE001 - S3 listing: any client error is a failed check
        raise DriftFailure(f"cannot list {uri}: {type(e).__name__}: {str(e)[:200]}") from None
    keys.sort()
    if len(keys) > max_images:
        keys = [keys[i] for i in np.sort(np.random.default_rng(0).choice(len(keys), max_images, replace=False))]
    paths = []
    for i, key in enumerate(keys):
        p = dest / f"{i:06d}{Path(key).suffix.lower()}"
        try:
            s3.download_file(bucket, key, str(p))
        except Exception as e:  # noqa: BLE001 - S3 download: any client error is a failed check
            raise DriftFailure(f"cannot download s3://{bucket}/{key}: {type(e).__name__}: {str(e)[:200]}") from None
        paths.append(p)
    return paths


def load_batch(source: str, meta: dict[str, Any], *, max_images: int = MAX_BATCH_DEFAULT, seed: int = 0
               ) -> tuple[np.ndarray, int]:
    """uint8 (N, size, size, 3) pixels of the batch and how many images were found before sampling.

    AOI models take crops as the candidate step writes them (RGB = tested, template, difference); other sizes are
    resized. Folder-per-class models take any image, fitted to the square like in training.
    """
    from defectops.training.images import ImageError, resized_image, square_image
    from defectops.training.importers import IMAGE_EXTENSIONS

    whole = isinstance(meta["input_size"], list)  # an anomaly model: the whole image resized to (height, width)
    h, w = (int(v) for v in meta["input_size"]) if whole else (int(meta["input_size"]),) * 2
    mode = "resize" if meta.get("task") == "aoi" else str(meta.get("fit_mode", "letterbox"))
    with tempfile.TemporaryDirectory(prefix="defectops-drift-") as tmp:
        if source.startswith("s3://"):
            paths = _download_s3(source, Path(tmp), max_images)
            found = len(paths)
        else:
            root = Path(source).expanduser()
            if not root.exists():
                raise DriftUsageError(f"--images {source} does not exist")
            paths = [root] if root.is_file() else sorted(
                q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in q.relative_to(root).parts))
            found = len(paths)
            if len(paths) > max_images:
                paths = [paths[i] for i in np.sort(np.random.default_rng(seed).choice(len(paths), max_images,
                                                                                      replace=False))]
        if not paths:
            raise DriftUsageError(f"no images found in {source}")
        out = np.empty((len(paths), h, w, 3), np.uint8)
        for k, p in enumerate(paths):
            try:
                out[k] = resized_image(p, h, w) if whole else square_image(p, h, mode)
            except ImageError as e:
                raise DriftUsageError(str(e)) from None
    return out, found


def check(model: CheckedModel, images: np.ndarray, *, alpha: float, n_perm: int, seed: int,
          min_psi: float) -> tuple[Any, Profile]:
    """The drift report of ``images`` against the model's reference, and the batch profile."""
    from defectops.evaluation.drift import compare

    task = str(model.meta.get("task", "aoi"))
    if task == "anomaly":
        from defectops.evaluation.anomaly import ScoreNormalization
        from defectops.evaluation.drift_profile import profile_from_anomaly_model

        norm = ScoreNormalization.from_dict(model.meta["normalization"])
        batch = profile_from_anomaly_model(model.net, images, model.reference.classes, norm)
    else:
        batch = profile_from_images(model.net, images, model.reference.classes, task)
    return compare(model.reference, batch, alpha=alpha, n_perm=n_perm, seed=seed, min_psi=min_psi), batch


# --------------------------------------------------------------------------------------------------- retrain
def retrain_overrides(meta: dict[str, Any], data: str | None, *, resolve_latest: bool = True) -> list[str]:
    """Overrides that pin the data snapshot of a retrain: ``data`` if given, else the champion's own snapshot
    source. ``s3://bucket/prefix`` (its latest snapshot) is pinned to the fingerprint that is latest now, so the
    run is reproducible. Sources other than snapshots (synthetic, in-place folders) add nothing: the
    WorkflowTemplate's own data settings apply."""
    trained_on = meta.get("data") or {}
    src = data or (str(trained_on.get("root") or "") if trained_on.get("source") == "snapshot" else "")
    if not src:
        return []
    if src.startswith("s3://") and "@" not in src and resolve_latest:
        from defectops.training.remote import RemoteError, remote_fingerprint

        try:
            fp = remote_fingerprint(src)
        except (RemoteError, ValueError) as e:
            raise DriftFailure(f"cannot resolve the latest snapshot at {src}: {e}") from None
        if fp is None:
            raise DriftUsageError(f"no complete snapshot at {src}: push one with `defectops data push`")
        src = f"{src}@{fp}"
    return ["data=snapshot", f"data.root={src}"]


def report_annotation(report: dict[str, Any], model: CheckedModel, images: str) -> str:
    """A compact JSON summary of a drift report for the retrain Workflow's annotation."""
    doc = {"model": model.source, "images": images, "decision": report["decision"],
           "drifted": [s["name"] for s in report["signals"] if s["drifted"]],
           "min_p_value": min((s["p_value"] for s in report["signals"] if s["p_value"] is not None), default=None),
           "n_batch": report["n_batch"], "report_sha256": hashlib.sha256(json.dumps(report, sort_keys=True)
                                                                         .encode()).hexdigest()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
