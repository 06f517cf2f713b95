"""``defectops registry``: review model versions and decide which one is the champion, with an audit trail.

Why a separate command group: the pipeline only nominates a ``challenger``; approving, rejecting and rolling back are
human decisions (role ``quality-lead`` or ``admin``) enforced and recorded by :mod:`registry.governance`. The audit
trail lives in the registry's artifact store (:mod:`registry.audit_store`); ``<DefectOps home>/audit/`` only holds
the same-host locks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_USAGE, console, fail, resolve_tracking_uri

registry_app = typer.Typer(help="Review, approve, reject and roll back model versions (audited).",
                           no_args_is_help=True)

Model = Annotated[str | None, typer.Option("--model", help="Registered model name (default: registry.model_name).")]
Uri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI,"
                                                                " else sqlite:///<home>/mlflow.db).")]
Reason = Annotated[str, typer.Option("--reason", help="Why (required; recorded in the audit trail).")]
Actor = Annotated[str | None, typer.Option("--as", help="Who decides, embedded registry only (default: "
                                                       "$DEFECTOPS_USER, else the OS user). A shared MLflow server "
                                                       "takes the user from its authentication.")]
Role = Annotated[str | None, typer.Option("--role", help="Role of the actor, embedded registry only (default "
                                                         "ml-engineer); quality-lead or admin may decide. A shared "
                                                         "MLflow server takes the role from the user's permission on "
                                                         "the model (MANAGE: quality-lead).")]


def _home() -> Path:
    from defectops.pipelines.config import home_dir

    return home_dir()


def _model(model: str | None) -> str:
    from defectops.registry.config import RegistryConfig

    return model or RegistryConfig().model_name


def _client(tracking_uri: str | None) -> Any:
    from defectops.registry.mlflow_registry import client

    uri = resolve_tracking_uri(tracking_uri, _home())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise fail(f"no registry at {uri}: run `defectops run` first, or pass --tracking-uri", EXIT_USAGE)
    return client(uri)


def _decide(action: str, *, actor: str | None, role: str | None, **kwargs: Any) -> None:
    """Run a governance decision under the decider's identity (:mod:`registry.identity`): on a shared registry the
    authenticated MLflow user and the role from their permission, on the embedded one the declared local user."""
    from defectops.registry import governance
    from defectops.registry.identity import IdentityError, resolve_identity

    c = kwargs["client"]
    try:
        who = resolve_identity(c.tracking_uri, kwargs["model"], declared_user=actor, declared_role=role)
    except IdentityError as e:
        raise fail(str(e), EXIT_USAGE) from None
    try:
        rec = getattr(governance, action)(actor=who.user, role=who.role, identity=who.source, **kwargs)
    except governance.GovernanceError as e:
        raise fail(str(e), EXIT_FAILURE) from None
    console.print(f"{action}: {escape(rec.model)} version {rec.version} (previous champion "
                  f"{rec.previous_champion or 'none'}) by {escape(rec.actor)}; audit #{rec.seq} {rec.hash[:12]}",
                  highlight=False)


@registry_app.command("list")
def list_cmd(model: Model = None, tracking_uri: Uri = None) -> None:
    """List the versions: aliases, gates, review status, macro recall."""
    from defectops.registry.governance import GovernanceError, list_versions

    name = _model(model)
    try:
        rows = list_versions(_client(tracking_uri), name)
    except GovernanceError as e:
        raise fail(str(e), EXIT_USAGE) from None
    t = Table(title=f"model {name}", title_justify="left")
    for col in ("version", "aliases", "gates", "review", "macro recall", "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["version"], ",".join(r["aliases"]) or "-", "passed" if r["gates_passed"] else "failed",
                  r["review_status"], f"{r['macro_recall']:.4f}", r["created"])
    console.print(t)


@registry_app.command("show")
def show(version: Annotated[str, typer.Argument(help="Model version number.")], model: Model = None,
         tracking_uri: Uri = None) -> None:
    """Show one version: aliases, run and every tag."""
    from mlflow.exceptions import MlflowException

    name, c = _model(model), _client(tracking_uri)
    try:
        mv = c.get_model_version(name, version)
    except MlflowException:
        raise fail(f"model {name!r} has no version {version}; run `defectops registry list`", EXIT_USAGE) from None
    console.print_json(json.dumps({"model": name, "version": str(mv.version), "aliases": sorted(mv.aliases),
                                   "run_id": mv.run_id, "source": mv.source, "tags": dict(sorted(mv.tags.items()))}))


@registry_app.command("approve")
def approve_cmd(version: Annotated[str, typer.Argument(help="Version to promote to champion.")], reason: Reason,
                actor: Actor = None, role: Role = None,
                max_regression: Annotated[float | None, typer.Option(
                    help="Allowed drop of macro and per-class recall against the champion (default: gates.)")]
                = None,
                model: Model = None, tracking_uri: Uri = None) -> None:
    """Promote the challenger VERSION to champion (re-checks gates and no-regression against the champion)."""
    from defectops.evaluation.gates import GateConfig
    from defectops.registry.config import RegistryConfig

    _decide("approve", client=_client(tracking_uri), model=_model(model), version=version, actor=actor,
            role=role, reason=reason, cfg=RegistryConfig(),
            max_regression=GateConfig().max_regression if max_regression is None else max_regression,
            lock_dir=_home())


@registry_app.command("reject")
def reject_cmd(version: Annotated[str, typer.Argument(help="Version to reject.")], reason: Reason,
               actor: Actor = None, role: Role = None, model: Model = None, tracking_uri: Uri = None) -> None:
    """Reject VERSION: mark it rejected and remove its challenger alias."""
    from defectops.registry.config import RegistryConfig

    _decide("reject", client=_client(tracking_uri), model=_model(model), version=version, actor=actor,
            role=role, reason=reason, cfg=RegistryConfig(), lock_dir=_home())


@registry_app.command("rollback")
def rollback_cmd(reason: Reason, actor: Actor = None, role: Role = None, model: Model = None,
                 tracking_uri: Uri = None) -> None:
    """Move champion back to the version it replaced (from the audit trail)."""
    from defectops.registry.config import RegistryConfig

    _decide("rollback", client=_client(tracking_uri), model=_model(model), actor=actor, role=role,
            reason=reason, cfg=RegistryConfig(), lock_dir=_home())


@registry_app.command("audit")
def audit_cmd(verify: Annotated[bool, typer.Option(
                  "--verify", help="Check the hash chain, that its last record is the head tag and that the version "
                                   "tags agree with it; exit 1 if not.")] = False,
              model: Model = None, tracking_uri: Uri = None) -> None:
    """Print the model's audit trail, as stored in the registry (and verify it)."""
    from defectops.registry.audit_store import RegistryTrail

    name = _model(model)
    result = RegistryTrail(_client(tracking_uri), name, _home()).check()
    t = Table(title=f"audit trail: {result.location}", title_justify="left")
    for col in ("seq", "time", "actor", "role", "action", "version", "prev champion", "reason", "hash"):
        t.add_column(col)
    for r in result.records:
        t.add_row(*(escape(str(r.get(k))) for k in ("seq", "time", "actor", "role", "action", "version",
                                                    "previous_champion", "reason")), str(r.get("hash"))[:12])
    console.print(t)
    if verify:
        if not result.ok:
            where = "" if result.first_bad_seq is None else f" at record {result.first_bad_seq}"
            raise fail(f"audit trail at {result.location} is broken{where}: {result.problem}; restore it from "
                       "a backup", EXIT_FAILURE)
        console.print(f"audit trail intact: {len(result.records)} records")
    elif not result.ok:
        console.print(f"[red]warning[/]: {escape(result.problem)} (run with --verify)")


def register(app: typer.Typer) -> None:
    """``defectops registry ...``."""
    app.add_typer(registry_app, name="registry")
