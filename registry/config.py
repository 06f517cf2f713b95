"""Registry configuration (Hydra structured-config group ``registry``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RegistryConfig:
    """Where MLflow lives and which registered model a run belongs to.

    ``tracking_uri`` defaults to the SQLite database under the DefectOps home (``sqlite:///<home>/mlflow.db``) with
    artifacts in ``<home>/mlartifacts``; point it at an ``http(s)://`` MLflow server in production.
    """

    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "defectops"
    model_name: str = "defectops-aoi"
    challenger_alias: str = "challenger"
    champion_alias: str = "champion"
