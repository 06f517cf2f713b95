"""The run's MLflow run and registry client: every step that logs or registers goes through these, so a run has one
MLflow run however many processes or pods its steps ran in (its id is recorded in ``RUN.mlflow_run``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from defectops.core import tags as T
from defectops.core.fsutil import read_json, write_json
from defectops.core.layout import RUN
from defectops.pipelines.config import artifact_location, tracking_uri
from defectops.pipelines.context import StepContext, StepError
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


def record_export_verdict(ctx: StepContext, registry: RegistryConfig, tags: Mapping[str, str],
                          problems: Sequence[str], what: str = "exported model") -> tuple[Any, str, str]:
    """Tag the run's registered version with its export's verdicts (``tags``) and log the ONNX file and its parity
    record; with ``problems``, remove the challenger alias and raise :class:`StepError` listing them. Returns the
    client, the MLflow run id and the version (every task's verify_export ends this way)."""
    from defectops.registry import mlflow_registry as reg

    version = str(read_json(ctx.path(RUN.registration))["version"])
    c, rid = mlflow_run(ctx, registry)
    for k, v in tags.items():
        c.set_model_version_tag(registry.model_name, version, k, v)
    c.log_artifact(rid, str(ctx.path(RUN.onnx)), "onnx")
    c.log_artifact(rid, str(ctx.path(RUN.parity)), "onnx")
    if problems:
        if registry.challenger_alias in reg.aliases_of(c, registry.model_name, version):
            c.delete_registered_model_alias(registry.model_name, registry.challenger_alias)
        raise StepError(f"{what} failed verification, challenger alias removed: " + "; ".join(problems))
    return c, rid, version


def publish_verified(ctx: StepContext, client: Any, rid: str, registry: RegistryConfig, version: str, serve: str,
                     int8: Mapping[str, Any] | None, extra_tags: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """After an export passed verification: tag the version with its INT8 verdict (when one was made: published,
    macro-recall drop, why refused, and ``extra_tags``), log the INT8 report (and the INT8 model where it holds),
    and choose what Triton serves: the INT8 model when ``serve`` is ``int8`` and it holds, else FP32 (said). Returns
    the served file and its precision, also tagged on the version. An INT8 refusal never fails the step."""
    if int8 is not None:
        tags = {T.INT8_PUBLISHED: str(int8["publish"]).lower(),
                T.INT8_MACRO_RECALL_DROP: f"{int8['macro_recall_drop']:.6f}", **(extra_tags or {}),
                T.INT8_REFUSED: "; ".join(int8["reasons"]) or "none"}
        for k, v in tags.items():
            client.set_model_version_tag(registry.model_name, version, k, v[:5000])
        client.log_artifact(rid, str(ctx.path(RUN.int8_report)), "onnx")
        if int8["publish"]:
            client.log_artifact(rid, str(ctx.path(RUN.onnx_int8)), "onnx")
        else:
            ctx.reporter.log("INT8 model not published: " + "; ".join(int8["reasons"]))
    served = ctx.path(RUN.onnx)
    if serve == "int8":
        if int8 and int8["publish"]:
            served = ctx.path(RUN.onnx_int8)
        else:
            ctx.reporter.log("export.serve=int8 but the INT8 model was not verified: serving FP32")
    precision = "int8" if served == ctx.path(RUN.onnx_int8) else "fp32"
    client.set_model_version_tag(registry.model_name, version, T.SERVED_PRECISION, precision)
    return served, precision
