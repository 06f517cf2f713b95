"""``register``: the model version in MLflow with its evidence (metrics, gates, report, validation, config, the review
page's dataset summary and misses, the drift reference profile); only a version that passed its gates becomes
``challenger``.

The ``model`` artifact is the tensors-only format of :mod:`training.models.model_format` (the task's ``save_model``):
logged with ``log_artifacts`` under ``model/`` of the run and registered with that folder as the version's source
(``create_model_version``), no MLflow flavor; nothing in it is unpickled when a version is loaded.

Reads: ``RUN.gates``, ``RUN.model``, ``RUN.metrics``, ``RUN.report``, ``RUN.validation``, ``RUN.config``,
``RUN.crops``, ``RUN.snapshot``, ``RUN.misses``. Writes: ``RUN.registered_model``, ``RUN.review_evidence``,
``RUN.drift``, ``RUN.registration``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from defectops.core import tags as T
from defectops.core.fsutil import atomic_dir, read_json, write_json
from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.evaluation.gates import GateReport
from defectops.pipelines.context import GateFailure, StepContext, StepError
from defectops.pipelines.results import RegisterResult
from defectops.pipelines.tasks import Task, create_task
from defectops.pipelines.tracking import mlflow_run
from defectops.registry.config import RegistryConfig
from defectops.training.config import AnomalyConfig, DataConfig
from defectops.training.snapshot import load_snapshot

READS = (RUN.gates, RUN.model, RUN.metrics, RUN.report, RUN.validation, RUN.config, RUN.crops, RUN.snapshot,
         RUN.misses, RUN.anomaly)
WRITES = (RUN.registered_model, RUN.review_evidence, RUN.drift, RUN.registration)


def _review_evidence(ctx: StepContext) -> Path:
    """``register/evidence/``: what the review page shows besides metrics and gates. ``dataset.json`` (fingerprints,
    sample counts per split and class, validation summary) and ``misses/`` (the report's worst-miss tiles with their
    Grad-CAM overlays as PNG files, ``misses/index.json`` listing them, as the evaluate step wrote them)."""
    out = ctx.path(RUN.review_evidence)
    if (out / "dataset.json").is_file():
        return out
    with atomic_dir(out) as tmp:
        crops_meta = ctx.path(RUN.crops) / "snapshot.json"
        crops = read_json(crops_meta) if crops_meta.is_file() else {}
        snap = load_snapshot(ctx.path(RUN.snapshot))
        stats = crops.get("stats") or {}
        write_json(tmp / "dataset.json", {
            "dataset_fingerprint": snap.fingerprint, "crops_fingerprint": crops.get("fingerprint"),
            "samples": len(snap.samples), "crops": crops.get("num_samples"), "boards": stats.get("boards"),
            "crops_per_split": stats.get("crops") or {}, "defects": stats.get("defects") or {},
            "candidate_recall": stats.get("candidate_recall_overall"),
            "validation": read_json(ctx.path(RUN.validation)) if ctx.path(RUN.validation).is_file() else {}})
        if ctx.path(RUN.misses).is_dir():
            shutil.copytree(ctx.path(RUN.misses), tmp / "misses")
        else:  # evaluated before the evaluate step wrote its tiles
            (tmp / "misses").mkdir()
            write_json(tmp / "misses" / "index.json", [])
    return out


def register(ctx: StepContext, registry: RegistryConfig, data: DataConfig, task: TaskKind,
             anomaly: AnomalyConfig) -> RegisterResult:
    """Register the model version with its evidence; only a version that passed its gates becomes challenger."""
    from defectops.registry import mlflow_registry as reg
    from defectops.training.models.model_format import is_registered_model

    gates = GateReport.from_dict(read_json(ctx.path(RUN.gates)))
    c, rid = mlflow_run(ctx, registry)
    model_dir = ctx.path(RUN.registered_model)
    if not is_registered_model(model_dir):  # the tensors-only format (a pickled MLflow model of before is replaced)
        with atomic_dir(model_dir) as tmp:
            create_task(task, anomaly=anomaly).save_model(ctx, tmp)
    c.log_artifact(rid, str(ctx.path(RUN.metrics)))
    for evidence in (RUN.gates, RUN.report, RUN.validation, RUN.config):
        c.log_artifact(rid, str(ctx.path(evidence)), "evidence")
    c.log_artifacts(rid, str(_review_evidence(ctx)), "evidence")
    c.log_artifacts(rid, str(model_dir), "model")
    c.log_artifacts(rid, str(_drift_reference(ctx, data, create_task(task, anomaly=anomaly))), "drift")
    metrics = read_json(ctx.path(RUN.metrics))
    for k in ("accuracy", "macro_recall", "escape_rate", "false_call_rate"):
        if metrics.get(k) is not None:
            c.log_metric(rid, f"test_{k}", float(metrics[k]))
    fingerprint = load_snapshot(ctx.path(RUN.snapshot)).fingerprint
    source = f"{c.get_run(rid).info.artifact_uri}/model"
    tags = {
        T.DATASET_FINGERPRINT: fingerprint,
        T.GIT_COMMIT: git_commit(),
        T.CONFIG_HASH: ctx.config_hash,
        T.GATES_PASSED: str(gates.passed).lower(),
        T.GATES_FAILED: ",".join(g.name for g in gates.failed()) or "none",
        T.MACRO_RECALL: f"{metrics['macro_recall']:.4f}",
        T.REVIEW_STATUS: "pending" if gates.passed else "not-eligible",
    }
    try:
        mv = reg.register(c, registry.model_name, source, rid, ctx.run_id, tags,
                          description=f"DefectOps run {ctx.run_id}")
    except Exception as e:  # noqa: BLE001 - any MLflow failure becomes a one-line step error
        raise StepError(f"could not register in MLflow at {c.tracking_uri}: {str(e)[:200]}") from None
    if T.REGISTERED_BY not in mv.tags:  # the submitter may not approve it later (separation of duties)
        from defectops.registry.governance import record_register

        record_register(c, registry.model_name, str(mv.version), actor=current_user(), role="ml-engineer",
                        lock_dir=ctx.home)
    if gates.passed:
        c.set_registered_model_alias(registry.model_name, registry.challenger_alias, str(mv.version))
    version = str(mv.version)
    result = RegisterResult(registry.model_name, version, reg.aliases_of(c, registry.model_name, version),
                            c.tracking_uri, rid, gates.passed)
    write_json(ctx.path(RUN.registration), result.to_dict())
    if not gates.passed:
        failed = [f"{g.name} ({g.detail})" for g in gates.failed()]
        raise GateFailure(f"gates failed, version {mv.version} registered without '{registry.challenger_alias}': "
                          + "; ".join(failed), [g.name for g in gates.failed()])
    return result


def _drift_reference(ctx: StepContext, data: DataConfig, task: Task) -> Path:
    """``RUN.drift``: the task's reference profile of its held-out data, which ``defectops drift check`` compares
    production batches with (computed once; a rerun reuses it). A run started by a drift check keeps that check's
    report beside it."""
    from defectops.evaluation.drift_profile import REFERENCE_JSON

    out = ctx.path(RUN.drift)
    if not (out / REFERENCE_JSON).is_file():
        task.drift_reference(ctx, data, out)
    trigger = ctx.path(RUN.trigger_report)
    if trigger.is_file():  # this run was started by a drift check: keep its report with the profile
        shutil.copyfile(trigger, out / "trigger-report.json")
    return Path(out)


def git_commit() -> str:
    """The commit of the code that runs, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_user() -> str:
    """Who is acting: $DEFECTOPS_USER, else the operating-system user."""
    return os.environ.get("DEFECTOPS_USER") or getpass.getuser()

