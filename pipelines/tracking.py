"""The run's MLflow run and registry client: every step that logs or registers goes through these, so a run has one
MLflow run however many processes or pods its steps ran in (its id is recorded in ``RUN.mlflow_run``)."""

from __future__ import annotations

from typing import Any

from defectops.core import tags as T
from defectops.core.fsutil import read_json, write_json
from defectops.core.layout import RUN
from defectops.pipelines.config import artifact_location, tracking_uri
from defectops.pipelines.context import StepContext
from defectops.registry.config import RegistryConfig


def registry_client(ctx: StepContext, registry: RegistryConfig) -> tuple[Any, str]:
    """An MLflow client of the configured registry and the id of the configured experiment (created if missing)."""
    from defectops.registry import mlflow_registry as reg

    c = reg.client(tracking_uri(registry, ctx.home))
    exp = reg.ensure_experiment(c, registry.experiment, artifact_location(registry, ctx.home))
    return c, exp


def mlflow_run(ctx: StepContext, registry: RegistryConfig) -> tuple[Any, str]:
    """The run's MLflow run (started once and recorded in the run root, so every step and a rerun log to it)."""
    from defectops.registry import mlflow_registry as reg

    c, exp = registry_client(ctx, registry)
    f = ctx.path(RUN.mlflow_run)
    existing = read_json(f)["run_id"] if f.is_file() else None
    rid = reg.start_run(c, exp, ctx.run_id, existing, {T.RUN_ID: ctx.run_id, T.CONFIG_HASH: ctx.config_hash})
    if rid != existing:
        write_json(f, {"run_id": rid, "tracking_uri": c.tracking_uri})
    return c, rid
