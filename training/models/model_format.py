"""The registered model format: tensors and plain values only, so that loading a registry version runs no code from
the artifact store (issue 17, trust boundaries).

A registered version's ``model`` artifact is a folder::

    model/
      defectops-model.json   what rebuilds the module: format, kind, the registry name and constructor kwargs,
                             classes, the weights file and its SHA-256
      weights.safetensors    kind "classifier": the state dict (safetensors, no pickle at all)
      model.pt               kind "anomaly": the PatchCore file of training.models.patchcore.save_anomaly_model
                             (a dict of tensors and plain values, read with torch.load(weights_only=True))

:func:`load_registered_model` reads such a folder (or downloads one from an MLflow URI: ``models:/name@alias``,
``runs:/...``, an artifact URI), rebuilds the module through the model registries (:func:`create_model`,
:func:`~training.models.patchcore.create_anomaly_model`) and loads the state dict strictly.

A version registered before this format is an MLflow ``pytorch`` flavor (``MLmodel`` + ``data/model.pth``, a
pickle): unpickling it runs whatever code its author (or anyone who could write to the artifact store) put there. It
is refused with :class:`PickledModelError` unless the caller opts in for that call (``allow_pickle=True``: the
``--allow-pickle`` flag of ``defectops drift check`` / ``bench latency``, or ``DEFECTOPS_ALLOW_PICKLE=1`` in the
environment); then a one-line warning names the risk.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from defectops.core.fsutil import sha256_file
from defectops.training.models import DefectClassifier, create_model

__all__ = ["ALLOW_PICKLE_ENV", "ANOMALY_WEIGHTS", "FORMAT", "META", "WEIGHTS", "ModelFormatError", "PickledModelError",
           "is_registered_model", "load_registered_model", "pickle_allowed", "plain_values", "read_meta",
           "save_registered_anomaly", "save_registered_classifier"]

FORMAT = "defectops-model-v1"
META = "defectops-model.json"
WEIGHTS = "weights.safetensors"
ANOMALY_WEIGHTS = "model.pt"
ALLOW_PICKLE_ENV = "DEFECTOPS_ALLOW_PICKLE"
KINDS = ("classifier", "anomaly")
PICKLE_RISK = "unpickling runs code from the artifact store"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


class ModelFormatError(ValueError):
    """The folder is not a registered model this version of DefectOps can read."""


class PickledModelError(ModelFormatError):
    """The folder is a pickled MLflow PyTorch model and the caller did not opt in to unpickling it."""



def plain_values(value: Any) -> Any:
    """``value`` as JSON/``weights_only`` plain values (mappings -> dict, sequences -> list, numpy scalars -> item)."""
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, Sequence):
        return [plain_values(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a plain value")


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    (out / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n")


def save_registered_classifier(model: DefectClassifier, out: Path, *, model_name: str, num_classes: int,
                               img_size: int, classes: Sequence[str], in_chans: int | None = None,
                               tta: str | None = None, kwargs: Mapping[str, Any] | None = None,
                               extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (a registry classifier) into the folder ``out`` as ``weights.safetensors`` and ``META``:
    :func:`load_registered_model` rebuilds it with ``create_model(model_name, num_classes=..., in_chans=...,
    img_size=..., tta=..., **kwargs)``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    constructor = {"num_classes": int(num_classes), "in_chans": int(in_chans or model.mean.shape[1]),
                   "img_size": int(img_size), "tta": str(tta or model.tta), "kwargs": plain_values(dict(kwargs or {}))}
    _write_meta(out, {"kind": "classifier", "model_name": model_name, "constructor": constructor,
                      "classes": [str(c) for c in classes], "weights": WEIGHTS,
                      "weights_sha256": sha256_file(out / WEIGHTS), "extra": plain_values(dict(extra or {}))})


def save_registered_anomaly(model: Any, out: Path, *, model_name: str, input_hw: tuple[int, int],
                            classes: Sequence[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write a fitted PatchCore into the folder ``out``: its tensors-only file
    (:func:`~training.models.patchcore.save_anomaly_model`) as ``model.pt`` and ``META``."""
    from defectops.training.models.patchcore import save_anomaly_model

    out.mkdir(parents=True, exist_ok=True)
    save_anomaly_model(model, out / ANOMALY_WEIGHTS, name=model_name, input_hw=input_hw, classes=classes,
                       extra=dict(extra or {}))
    constructor = {"num_neighbors": int(model.model.num_neighbors), "layers": list(model.spec.layers)}
    _write_meta(out, {"kind": "anomaly", "model_name": model_name, "constructor": constructor,
                      "input_hw": [int(input_hw[0]), int(input_hw[1])], "classes": [str(c) for c in classes],
                      "weights": ANOMALY_WEIGHTS, "weights_sha256": sha256_file(out / ANOMALY_WEIGHTS),
                      "extra": plain_values(dict(extra or {}))})


def is_registered_model(folder: Path) -> bool:
    """Whether ``folder`` holds a model in this format (its ``META``)."""
    return (Path(folder) / META).is_file()


def read_meta(folder: Path) -> dict[str, Any]:
    """``META`` of ``folder``, checked (format, kind, weights file present with its SHA-256)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{folder / META} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise ModelFormatError(f"{folder / META} is not a {FORMAT} description (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r}): upgrade DefectOps")
    weights = folder / str(meta.get("weights", ""))
    if Path(str(meta.get("weights", ""))).name != meta.get("weights") or not weights.is_file():
        raise ModelFormatError(f"{folder} has no weights file {meta.get('weights')!r}: the artifact is incomplete")
    if meta.get("weights_sha256") != sha256_file(weights):
        raise ModelFormatError(f"{weights} does not match the SHA-256 in {META}: the artifact is damaged or was "
                               f"altered")
    return meta


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """The opt-in to unpickling: ``allow_pickle`` when given, else ``DEFECTOPS_ALLOW_PICKLE=1``."""
    if allow_pickle is not None:
        return allow_pickle
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _load_folder(folder: Path, origin: str, allow_pickle: bool | None, warn: Callable[[str], None]) -> nn.Module:
    if is_registered_model(folder):
        meta = read_meta(folder)
        if meta["kind"] == "anomaly":
            from defectops.training.models.patchcore import load_anomaly_model

            anomaly, _ = load_anomaly_model(folder / str(meta["weights"]))
            return anomaly
        from safetensors.torch import load_file

        c = meta["constructor"]
        model = create_model(str(meta["model_name"]), num_classes=int(c["num_classes"]), in_chans=int(c["in_chans"]),
                             img_size=int(c["img_size"]), tta=str(c["tta"]), pretrained=False, **dict(c["kwargs"]))
        model.load_state_dict(load_file(str(folder / str(meta["weights"])), device="cpu"), strict=True)
        return model.eval()
    if (folder / "MLmodel").is_file():
        if not pickle_allowed(allow_pickle):
            raise PickledModelError(
                f"{origin} is a pickled MLflow PyTorch model (data/model.pth), and {PICKLE_RISK}: refused; "
                f"re-register it in the {FORMAT} format, or opt in for this call with --allow-pickle "
                f"(or {ALLOW_PICKLE_ENV}=1) if you trust everyone who can write to that store")
        import mlflow.pytorch

        warn(f"warning: loading {origin}, a pickled MLflow PyTorch model: {PICKLE_RISK} (allowed by --allow-pickle "
             f"or {ALLOW_PICKLE_ENV}=1)")
        pickled: nn.Module = mlflow.pytorch.load_model(str(folder), map_location="cpu")
        return pickled.eval()
    raise ModelFormatError(f"{origin} is not a DefectOps registered model: no {META}")


def load_registered_model(path_or_uri: str | Path, *, allow_pickle: bool | None = None,
                          tracking_uri: str | None = None,
                          warn: Callable[[str], None] = _stderr) -> nn.Module:
    """The module of a registered version's ``model`` artifact, in eval mode on CPU: a local folder, or an MLflow URI
    (``models:/name@alias``, ``models:/name/<version>``, ``runs:/<run>/model``, an artifact-store URI) downloaded
    first. No pickle is read: the classifier's weights are safetensors, the anomaly model's a ``weights_only`` file.

    A pickled MLflow PyTorch model raises :class:`PickledModelError` unless ``allow_pickle`` (default:
    ``DEFECTOPS_ALLOW_PICKLE=1``) opts in, in which case ``warn`` gets a one-line warning naming the risk."""
    src = str(path_or_uri)
    if _URI.match(src) and not Path(src).exists():
        import mlflow.artifacts

        artifact_uri = _version_source(src, tracking_uri) if src.startswith("models:/") else src
        with tempfile.TemporaryDirectory(prefix="defectops-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
            return _load_folder(Path(local), src, allow_pickle, warn)
    return _load_folder(Path(src).expanduser(), src, allow_pickle, warn)


def _version_source(uri: str, tracking_uri: str | None) -> str:
    """The artifact URI of the version behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the
    registry is the tracking server's, ``tracking_uri`` or MLflow's default)."""
    from mlflow import MlflowClient

    m = _MODELS_URI.match(uri)
    if m is None:
        raise ModelFormatError(f"{uri} is not models:/<name>@<alias> or models:/<name>/<version>")
    c = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name, alias, version = m.group("name"), m.group("alias"), m.group("version")
    if alias is not None:
        version = str(c.get_model_version_by_alias(name, alias).version)
    return str(c.get_model_version_download_uri(name, str(version)))
