"""Thin, idempotent operations on the MLflow 3 tracking server and model registry.

Registration is keyed by the DefectOps run id (version tag ``defectops.run_id``): repeating the register step after
a crash finds the version it already created instead of adding a duplicate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectops.core import tags as T

RUN_TAG = T.RUN_ID


class RegistryError(RuntimeError):
    """The registry is unreachable or refused an operation."""


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to ``tracking_uri``; process-wide MLflow state (and MLFLOW_TRACKING_URI) is left alone."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(c: MlflowClient, name: str, artifact_location: str | None) -> str:
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        return str(c.create_experiment(name, artifact_location=artifact_location))
    except MlflowException as e:
        raise RegistryError(f"MLflow at {c.tracking_uri} refused experiment {name!r}: {e.message[:200]}") from None


def start_run(c: MlflowClient, experiment_id: str, run_name: str, existing: str | None,
              tags: Mapping[str, str]) -> str:
    """Return the MLflow run id to log into: ``existing`` when it still exists, else a new run."""
    if existing:
        try:
            c.get_run(existing)
            return existing
        except MlflowException:
            pass
    return str(c.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id)


def find_version(c: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    try:
        versions = c.search_model_versions(f"name = '{model_name}' and tag.`{RUN_TAG}` = '{run_id}'")
    except MlflowException:
        return None
    return versions[0] if versions else None


def register(c: MlflowClient, model_name: str, source: str, mlflow_run_id: str, defectops_run_id: str,
             tags: Mapping[str, str], description: str = "") -> ModelVersion:
    """Create (or find, when repeated) the model version for a DefectOps run and set its tags."""
    try:
        c.get_registered_model(model_name)
    except MlflowException:
        c.create_registered_model(model_name, description="DefectOps defect classifier (AOI candidate verification)")
    mv = find_version(c, model_name, defectops_run_id)
    if mv is None:
        mv = c.create_model_version(model_name, source, run_id=mlflow_run_id, tags={RUN_TAG: defectops_run_id},
                                    description=description)
    for k, v in tags.items():
        c.set_model_version_tag(model_name, str(mv.version), k, str(v))
    return c.get_model_version(model_name, str(mv.version))


def aliases_of(c: MlflowClient, model_name: str, version: str) -> list[str]:
    return sorted(c.get_model_version(model_name, str(version)).aliases)


def alias_version(c: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    try:
        return c.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def log_params(c: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    existing = c.get_run(run_id).data.params
    for k, v in params.items():
        sv = str(v)[:6000]
        if k not in existing:
            c.log_param(run_id, k, sv)
