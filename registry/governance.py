"""Human sign-off on the model registry: approve, reject and roll back champions, with an audit trail.

What: :func:`approve` promotes the ``challenger`` version to ``champion`` after re-checking, at decision time, that it
passed its gates, that the reviewer may decide (role ``quality-lead`` or ``admin``, not the person who registered
it) and that it does not regress against the current champion; :func:`reject` retires a candidate; :func:`rollback`
restores the champion that the audit trail says came before. Every decision is appended to the hash-chained trail
stored in the registry itself (:mod:`registry.audit_store`) and mirrored as a version tag ``defectops.audit.<seq>``
for the MLflow UI (and as a cross-check of the trail).

Why: the pipeline may only nominate (``challenger``); putting a model on the production line is a human decision
that must be authorised, explained and reconstructible. Decisions on one model are serialised by an ``fcntl`` lock
in ``lock_dir`` (per host) and every check re-reads the registry under that lock, so two concurrent approvals on one
host cannot leave two champions or a forked trail. Across hosts, each decision reads the trail head before its checks
and appends only after that head (``after=``): on an S3 artifact store that is a conditional put, so of two hosts
deciding at once exactly one records its decision and the other is refused before changing anything (see
:mod:`registry.audit_store` for the stores where that is not available).

Refusals are :class:`GovernanceError` subclasses so that callers (the CLI, the review web app) can map them to exit
codes or HTTP statuses without re-implementing the rules: :class:`InvalidDecision` (a missing reason),
:class:`NotPermitted` (wrong role, separation of duties), :class:`NotFound` (no such model or version) and the
plain :class:`GovernanceError` for a decision the registry's current state does not allow.
"""

from __future__ import annotations

import json
import math
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectops.core import tags as T
from defectops.evaluation.gates import GateConfig, evaluate_gates
from defectops.evaluation.metrics import ClassificationMetrics
from defectops.registry import audit
from defectops.registry.audit import AuditError, AuditRecord
from defectops.registry.audit_store import RegistryTrail
from defectops.registry.config import RegistryConfig

__all__ = ["DECIDER_ROLES", "GovernanceError", "InvalidDecision", "NotFound", "NotPermitted", "approve",
           "champion_history", "list_versions", "read_artifact", "record_register", "reject", "rollback", "trail"]

DECIDER_ROLES = ("quality-lead", "admin")
TAG = T.PREFIX  # decision fields are tagged defectops.<field>
METRICS_ARTIFACT = "metrics.json"
GATES_ARTIFACT = "evidence/gates.json"


class GovernanceError(RuntimeError):
    """A registry decision was refused; the message names the problem and the fix. The base class means the current
    state of the registry does not allow it (HTTP 409)."""


class InvalidDecision(GovernanceError):
    """The request itself is incomplete, e.g. no reason (HTTP 400)."""


class NotPermitted(GovernanceError):
    """This actor may not make this decision: role, or separation of duties (HTTP 403)."""


class NotFound(GovernanceError):
    """No such registered model or version (HTTP 404)."""


def trail(client: MlflowClient, model: str, lock_dir: Path) -> RegistryTrail:
    """The registry-stored audit trail of ``model`` (locks under ``lock_dir``)."""
    try:
        return RegistryTrail(client, model, lock_dir)
    except AuditError as e:
        raise InvalidDecision(str(e)) from None


# ------------------------------------------------------------------------------------------------ registry reads
def _version(client: MlflowClient, model: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(model, str(version))
    except MlflowException:
        raise NotFound(f"model {model!r} has no version {version}; run `defectops registry list` to see "
                       "the versions") from None


def _alias(client: MlflowClient, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None


def read_artifact(client: MlflowClient, run_id: str | None, path: str) -> bytes | None:
    """The bytes of artifact ``path`` of run ``run_id``; ``None`` when there is no such run or file."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="defectops-gov-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        p = Path(local)
        return p.read_bytes() if p.is_file() else None


def _evidence(client: MlflowClient, mv: ModelVersion) -> str:
    return audit.evidence_digest(read_artifact(client, mv.run_id, GATES_ARTIFACT),
                                 read_artifact(client, mv.run_id, METRICS_ARTIFACT))


def _metrics(client: MlflowClient, model: str, mv: ModelVersion) -> ClassificationMetrics:
    raw = read_artifact(client, mv.run_id, METRICS_ARTIFACT)
    if raw is None:
        raise GovernanceError(f"version {mv.version} of {model!r} has no {METRICS_ARTIFACT} in run {mv.run_id}; "
                              "re-run its pipeline's register step to log the evidence")
    try:
        return ClassificationMetrics.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        raise GovernanceError(f"{METRICS_ARTIFACT} of version {mv.version} (run {mv.run_id}) is malformed; "
                              "re-run its pipeline's evaluate and register steps") from None


# ---------------------------------------------------------------------------------------------------- checks
def _check_decider(role: str, reason: str, what: str) -> None:
    if role not in DECIDER_ROLES:
        raise NotPermitted(f"role {role!r} may not {what}; ask a {' or '.join(DECIDER_ROLES)} (--role)")
    if not reason or not reason.strip():
        raise InvalidDecision(f"a reason is required to {what}; say why (--reason 'why')")


def _regressions(candidate: ClassificationMetrics, champion: ClassificationMetrics,
                 max_regression: float) -> list[str]:
    """The no-regression gates the candidate fails against the champion, e.g. ``recall[short] 0.7000 < 0.9300``."""
    report = evaluate_gates(candidate, GateConfig(max_regression=max_regression), champion=champion)
    return [f"{r.metric} {r.value if r.value is None else f'{r.value:.4f}'} < {r.threshold:.4f}"
            for r in report.failed() if r.name.startswith("no_regression:")]


def _mirror(client: MlflowClient, model: str, version: str, rec: AuditRecord) -> None:
    """Show the record on the version in the MLflow UI (the registry-stored trail stays the source of truth)."""
    value = json.dumps({"hash": rec.hash, "action": rec.action, "actor": rec.actor, "reason": rec.reason,
                        "time": rec.time}, sort_keys=True)
    client.set_model_version_tag(model, version, f"{T.AUDIT_PREFIX}{rec.seq}", value)


def _head(t: RegistryTrail) -> str:
    """The trail head a decision is based on: read before the registry checks, so that a decision recorded by
    another host in between makes the append after it fail (compare-and-set on S3) instead of forking the trail."""
    try:
        return t.head_hash()
    except AuditError as e:
        raise GovernanceError(str(e)) from None


def _append(t: RegistryTrail, **fields: Any) -> AuditRecord:
    try:
        return t.append(**fields)
    except AuditError as e:  # TrailConflict included: another decision was recorded first, nothing changed
        raise GovernanceError(str(e)) from None


# ------------------------------------------------------------------------------------------------- decisions
def approve(client: MlflowClient, model: str, version: str, *, actor: str, role: str, reason: str,
            cfg: RegistryConfig, max_regression: float, lock_dir: Path, identity: str = "") -> AuditRecord:
    """Promote ``version`` (the gated ``challenger``) to ``champion``; raises :class:`GovernanceError` if refused."""
    _check_decider(role, reason, "approve a model version")
    version = str(version)
    t = trail(client, model, lock_dir)
    with t.locked():
        head = _head(t)
        mv = _version(client, model, version)
        tags = dict(mv.tags)
        if tags.get(T.GATES_PASSED) != "true":
            raise GovernanceError(f"version {version} of {model!r} did not pass its release gates "
                                  f"({tags.get(T.GATES_FAILED, 'unknown')}); only a gated challenger can be "
                                  "approved")
        if _alias(client, model, cfg.challenger_alias) != version:
            raise GovernanceError(f"version {version} of {model!r} is not the '{cfg.challenger_alias}'; approve the "
                                  "current challenger (see `defectops registry list`)")
        registered_by = tags.get(T.REGISTERED_BY)
        if registered_by and registered_by == actor:
            raise NotPermitted(f"{actor!r} registered version {version} and may not approve it (separation of "
                               "duties); ask another quality lead")
        champion = _alias(client, model, cfg.champion_alias)
        if champion is not None and champion != version:
            failing = _regressions(_metrics(client, model, mv),
                                   _metrics(client, model, _version(client, model, champion)), max_regression)
            if failing:
                raise GovernanceError(f"version {version} regresses against champion {champion} by more than "
                                      f"{max_regression}: {'; '.join(failing)}; retrain or reject it")
        rec = _append(t, after=head, actor=actor, role=role, identity=identity, action="approve", version=version,
                      previous_champion=champion, reason=reason, evidence=_evidence(client, mv))
        client.set_registered_model_alias(model, cfg.champion_alias, version)
        client.delete_registered_model_alias(model, cfg.challenger_alias)
        for k, v in {"review_status": "approved", "reviewer": actor, "review_reason": reason,
                     "decided_at": rec.time, "previous_champion": champion or "none"}.items():
            client.set_model_version_tag(model, version, f"{TAG}{k}", v)
        _mirror(client, model, version, rec)
        return rec


def reject(client: MlflowClient, model: str, version: str, *, actor: str, role: str, reason: str,
           cfg: RegistryConfig, lock_dir: Path, identity: str = "") -> AuditRecord:
    """Mark ``version`` rejected and take away its ``challenger`` alias; the champion cannot be rejected."""
    _check_decider(role, reason, "reject a model version")
    version = str(version)
    t = trail(client, model, lock_dir)
    with t.locked():
        head = _head(t)
        mv = _version(client, model, version)
        if _alias(client, model, cfg.champion_alias) == version:
            raise GovernanceError(f"version {version} of {model!r} is the '{cfg.champion_alias}'; use "
                                  "`defectops registry rollback` to replace it")
        rec = _append(t, after=head, actor=actor, role=role, identity=identity, action="reject", version=version,
                      previous_champion=_alias(client, model, cfg.champion_alias), reason=reason,
                      evidence=_evidence(client, mv))
        if _alias(client, model, cfg.challenger_alias) == version:
            client.delete_registered_model_alias(model, cfg.challenger_alias)
        for k, v in {"review_status": "rejected", "reviewer": actor, "review_reason": reason,
                     "decided_at": rec.time}.items():
            client.set_model_version_tag(model, version, f"{TAG}{k}", v)
        _mirror(client, model, version, rec)
        return rec


def champion_history(records: list[dict[str, Any]]) -> list[str]:
    """The champion stack the trail implies: approvals push, rollbacks pop (pure)."""
    stack: list[str] = []
    for r in records:
        if r.get("action") == "approve":
            if not stack and r.get("previous_champion"):
                stack.append(str(r["previous_champion"]))
            stack.append(str(r["version"]))
        elif r.get("action") == "rollback" and stack:
            stack.pop()
    return stack


def rollback(client: MlflowClient, model: str, *, actor: str, role: str, reason: str, cfg: RegistryConfig,
             lock_dir: Path, identity: str = "") -> AuditRecord:
    """Move ``champion`` back to the champion it replaced, as recorded in the audit trail."""
    _check_decider(role, reason, "roll back the champion")
    t = trail(client, model, lock_dir)
    with t.locked():
        result = t.check()
        if not result.ok:
            raise GovernanceError(f"audit trail at {result.location} is broken at record {result.first_bad_seq} "
                                  f"({result.problem}); restore it before rolling back")
        records = result.records
        current = _alias(client, model, cfg.champion_alias)
        stack = champion_history(records)
        if current is None or len(stack) < 2:
            raise GovernanceError(f"no previous champion of {model!r} is recorded in the audit trail; approve a "
                                  "version instead")
        if stack[-1] != current:
            raise GovernanceError(f"champion of {model!r} is version {current} but the audit trail says {stack[-1]} "
                                  "(alias moved outside governance); approve the intended version explicitly")
        target = stack[-2]
        mv = _version(client, model, target)
        head = str(records[-1]["hash"]) if records else audit.GENESIS
        rec = _append(t, after=head, actor=actor, role=role, identity=identity, action="rollback", version=target,
                      previous_champion=current, reason=reason, evidence=_evidence(client, mv))
        client.set_registered_model_alias(model, cfg.champion_alias, target)
        client.set_model_version_tag(model, current, T.REVIEW_STATUS, "rolled-back")
        for k, v in {"reviewer": actor, "review_reason": reason, "decided_at": rec.time,
                     "previous_champion": current}.items():
            client.set_model_version_tag(model, target, f"{TAG}{k}", v)
        _mirror(client, model, target, rec)
        return rec


def record_register(client: MlflowClient, model: str, version: str, *, actor: str, role: str,
                    lock_dir: Path) -> AuditRecord:
    """Record a registration in the trail and tag ``defectops.registered_by`` (for separation of duties)."""
    version = str(version)
    t = trail(client, model, lock_dir)
    with t.locked():
        mv = _version(client, model, version)
        rec = _append(t, actor=actor, role=role, action="register", version=version,
                      previous_champion=_alias(client, model, RegistryConfig().champion_alias),
                      reason=mv.description or "registered by the pipeline", evidence=_evidence(client, mv))
        client.set_model_version_tag(model, version, T.REGISTERED_BY, actor)
        _mirror(client, model, version, rec)
        return rec


def list_versions(client: MlflowClient, model: str) -> list[dict[str, Any]]:
    """Every version of ``model``, newest first: version, aliases, gates_passed, review_status, macro_recall,
    created (UTC ISO)."""
    try:
        aliases = dict(client.get_registered_model(model).aliases)
        versions = client.search_model_versions(f"name = '{model}'")
    except MlflowException:
        raise NotFound(f"no registered model {model!r} in this registry; check --model and "
                       "--tracking-uri") from None
    out = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = dict(mv.tags)
        recall = tags.get(T.MACRO_RECALL)
        out.append({
            "version": str(mv.version),
            "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
            "gates_passed": tags.get(T.GATES_PASSED) == "true",
            "review_status": tags.get(T.REVIEW_STATUS, "unknown"),
            "macro_recall": float(recall) if recall not in (None, "") else math.nan,
            "created": datetime.fromtimestamp(int(mv.creation_timestamp) / 1000, UTC).isoformat(timespec="seconds"),
        })
    return out
