"""Resolve what a user passes as ``--model`` to a local ONNX file and the metadata needed to use it alone.

Accepted: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the version's verified ONNX artifact, fetched
from the MLflow registry and cached under the DefectOps home), a run root (its ``export/model.onnx``), or an ONNX
file. Every ONNX file DefectOps exports carries its classes, input size and preprocessing in ``metadata_props``.

For a registered version or a run root, ``precision`` picks the artifact: ``served`` (default) is the one its
``verify_export`` step published to Triton (``export.serve``: the INT8 model only when it passed its re-validation),
so ``defectops predict`` measures what the line would run; ``fp32`` or ``int8`` ask for one explicitly, and ``int8``
is refused where no verified INT8 model exists.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectops.core import tags as T
from defectops.core.fsutil import atomic_dir
from defectops.core.layout import RUN
from defectops.serving.onnx_export import read_metadata

META_PREFIX = "defectops."
PRECISIONS = ("served", "fp32", "int8")
SERVED_TAG = T.SERVED_PRECISION  # version tag written by verify_export: fp32 | int8


class ModelRefError(ValueError):
    """The ``--model`` reference cannot be resolved."""


@dataclass(frozen=True)
class ResolvedModel:
    onnx_path: Path
    classes: tuple[str, ...]
    good_class: str
    input_size: int
    task: str  # "aoi" (candidate crops from board pairs) or "folder" (whole images)
    fit_mode: str = "letterbox"
    candidates: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    input_hw: tuple[int, int] | None = None
    """An anomaly model's input (height, width); ``None``: a square of ``input_size``."""
    anomaly: dict[str, Any] = field(default_factory=dict)
    """An anomaly model's operating point: ``threshold``, ``normalization`` (versioned), model and backbone."""


def model_metadata(classes: list[str], good_class: str, input_size: int, task: str, *, fit_mode: str = "letterbox",
                   candidates: dict[str, Any] | None = None, detector: dict[str, Any] | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``metadata_props`` written into an exported ONNX model."""
    meta = {"classes": json.dumps(classes), "good_class": good_class, "input_size": str(input_size), "task": task,
            "fit_mode": fit_mode, "candidates": json.dumps(candidates or {}), "detector": json.dumps(detector or {}),
            **(extra or {})}
    return {META_PREFIX + k: v for k, v in meta.items()}


def from_onnx(path: Path, source: str = "") -> ResolvedModel:
    if not path.is_file():
        raise ModelRefError(f"ONNX model {path} not found")
    meta = {k.removeprefix(META_PREFIX): v for k, v in read_metadata(path).items() if k.startswith(META_PREFIX)}
    if "classes" not in meta:
        raise ModelRefError(f"{path} has no DefectOps metadata (classes, input size): export it with defectops")
    return ResolvedModel(onnx_path=path, classes=tuple(json.loads(meta["classes"])), good_class=meta["good_class"],
                         input_size=int(meta["input_size"]), task=meta.get("task", "aoi"),
                         fit_mode=meta.get("fit_mode", "letterbox"),
                         candidates=json.loads(meta.get("candidates", "{}")),
                         detector=json.loads(meta.get("detector", "{}")), source=source or str(path),
                         input_hw=tuple(json.loads(meta["input_hw"])) if "input_hw" in meta else None,
                         anomaly=json.loads(meta.get("anomaly", "{}")))


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def resolve(ref: str, *, tracking_uri: str, cache_dir: Path, precision: str = "served") -> ResolvedModel:
    """Resolve ``ref`` (registry URI, run root or ONNX path) to a local ONNX model with its metadata; ``precision``
    (``served``, ``fp32``, ``int8``) picks the artifact of a registered version or run root."""
    if precision not in PRECISIONS:
        raise ModelRefError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    parsed = parse_registry_ref(ref)
    if parsed:
        return _from_registry(*parsed, tracking_uri, cache_dir, ref, precision)
    p = Path(ref).expanduser()
    if p.is_dir():
        return _from_run_root(p, ref, precision)
    if p.suffix == ".onnx":
        return from_onnx(p, ref)
    raise ModelRefError(f"--model {ref!r} is neither models:/name@alias, a run root, nor an .onnx file")


def _from_run_root(root: Path, ref: str, precision: str) -> ResolvedModel:
    onnx_path = root / RUN.onnx
    if not onnx_path.is_file():
        raise ModelRefError(f"run root {root} has no export/model.onnx: run its export step first")
    verified = root / RUN.marker("verify_export")
    result = (json.loads(verified.read_text()).get("result") or {}) if verified.is_file() else {}
    if precision == "served":
        precision = str(result.get("served", "fp32"))
    if precision == "int8":
        if not (result.get("int8") or {}).get("publish"):
            raise ModelRefError(f"run root {root} has no verified INT8 model (export.int8 and its verify_export "
                                f"step): use --precision fp32")
        return from_onnx(root / RUN.onnx_int8, f"{ref} (int8)")
    return from_onnx(onnx_path, ref)


def parse_registry_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """``(name, alias, version)`` of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``; ``None`` if ``ref``
    is no registry reference; :class:`ModelRefError` if it is a malformed one."""
    m = _MODELS_URI.match(ref)
    if m:
        return m.group("name"), m.group("alias"), m.group("version")
    if ref.startswith("models:/"):
        raise ModelRefError(f"bad registry reference {ref!r}: use models:/<name>@<alias> or models:/<name>/<version>")
    return None


def registry_version(name: str, alias: str | None, version: str | None, tracking_uri: str, ref: str) -> tuple[Any, Any]:
    """The MLflow client and the model version a registry reference names (with a run to fetch artifacts from)."""
    from mlflow.exceptions import MlflowException

    from defectops.registry.mlflow_registry import client

    c = client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, str(version))
    except MlflowException as e:
        raise ModelRefError(f"{ref} not found in the registry at {tracking_uri} ({e.error_code})") from None
    if not mv.run_id:
        raise ModelRefError(f"{ref} (version {mv.version}) has no MLflow run to fetch its artifacts from")
    return c, mv


def cache_folder(cache_dir: Path, kind: str, tracking_uri: str, name: str, version: str) -> Path:
    """Where artifacts of one registered version are cached: versions are numbered per registry."""
    return cache_dir / kind / hashlib.sha256(tracking_uri.encode()).hexdigest()[:12] / name / str(version)


def _from_registry(name: str, alias: str | None, version: str | None, tracking_uri: str, cache_dir: Path,
                   ref: str, precision: str = "served") -> ResolvedModel:
    c, mv = registry_version(name, alias, version, tracking_uri, ref)
    if mv.tags.get(T.EXPORT_VERIFIED) != "true":
        raise ModelRefError(f"{ref} (version {mv.version}) has no verified ONNX export: its verify_export step did "
                            f"not pass")
    if precision == "served":
        precision = mv.tags.get(SERVED_TAG, "fp32")
    if precision == "int8" and mv.tags.get(T.INT8_PUBLISHED) != "true":
        raise ModelRefError(f"{ref} (version {mv.version}) has no verified INT8 model: use --precision fp32")
    filename = "model.int8.onnx" if precision == "int8" else "model.onnx"
    dest = cache_folder(cache_dir, "models-int8" if precision == "int8" else "models", tracking_uri, name,
                        str(mv.version))
    onnx_path = dest / filename
    if not onnx_path.is_file():
        with atomic_dir(dest) as tmp:
            local = Path(c.download_artifacts(mv.run_id, f"onnx/{filename}", str(tmp)))
            if local != tmp / filename:
                local.replace(tmp / filename)
    suffix = ", int8" if precision == "int8" else ""
    return from_onnx(onnx_path, f"{ref} (version {mv.version}{suffix})")
