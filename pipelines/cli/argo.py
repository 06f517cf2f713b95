"""``defectops compile | submit | status``: the pipeline on Kubernetes as an Argo Workflow (``docs/kubernetes.md``).

``compile`` renders the WorkflowTemplate and the objects it needs from the DAG (``pipelines.argo.compiler``).
``submit`` and ``status`` talk to an Argo Server's REST API (``pipelines.argo.client``): ``ARGO_SERVER``
(``https://host:port`` or ``host:port``; plain http only when given as ``http://`` or with ``ARGO_SECURE=false``),
``ARGO_TOKEN`` (sent as a bearer token), ``ARGO_NAMESPACE``. TLS is verified unless ``--insecure`` (or
``ARGO_INSECURE_SKIP_VERIFY=true``); ``ARGO_CA_BUNDLE`` names a CA file. Server answers (401, 403, 404, 409 ...) and
network failures become one-line errors, exit code 1; missing settings and bad overrides exit 2.
"""

from __future__ import annotations

import getpass
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from defectops.pipelines.argo.client import ArgoClient, ArgoError
from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_GATES, EXIT_USAGE, Overrides, console, err, fail, load

DEFAULT_NAMESPACE = "defectops"
DEFAULT_TEMPLATE = "defectops-pipeline"
FINISHED = ("Succeeded", "Failed", "Error")

Namespace = Annotated[str, typer.Option("--namespace", "-n", envvar="ARGO_NAMESPACE",
                                        help="Kubernetes namespace of the workflows [env: ARGO_NAMESPACE].")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Skip TLS certificate verification of the Argo Server "
                                                           "(development only) [env: ARGO_INSECURE_SKIP_VERIFY].")]


def _user() -> str:
    try:
        return os.environ.get("DEFECTOPS_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _client(insecure: bool) -> ArgoClient:
    try:
        client = ArgoClient.from_env(insecure=insecure)
    except ValueError as e:
        raise fail(str(e), EXIT_USAGE) from None
    if client.plain_http_with_token:
        err.print("[yellow]warning:[/] sending ARGO_TOKEN over plain http to a non-local server")
    return client


def _q(*segments: str) -> str:
    return "/".join(urllib.parse.quote(s, safe="") for s in segments)


def _local_registry_warning(cfg: Any) -> str | None:
    uri = cfg.registry.tracking_uri or ""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return ("registry.tracking_uri is not an MLflow server: on Argo every step runs in its own pod with its own home, "
            "so a local SQLite registry would be lost between steps; pass registry.tracking_uri=https://<mlflow>")


# --- compile -------------------------------------------------------------------------------------------------------

def compile_cmd(
    overrides: Overrides = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the YAML files to.")] = Path("deploy/argo"),
    namespace: Annotated[str, typer.Option(help="Namespace of the workflows.")] = DEFAULT_NAMESPACE,
    image: Annotated[str, typer.Option(help="Default image (e.g. <account>.dkr.ecr.<region>.amazonaws.com/defectops)."
                                       )] = "defectops",
    tag: Annotated[str | None, typer.Option(help="Default image tag [default: the package version].")] = None,
    bucket: Annotated[str, typer.Option(help="S3 bucket of the run roots (Terraform output).")] = "defectops-runs",
    prefix: Annotated[str, typer.Option(help="Key prefix of the run roots (a trailing '/' is dropped).")] = "runs",
    artifact_bucket: Annotated[str | None, typer.Option(help="S3 bucket for Argo's logs and artifacts "
                                                             "[default: --bucket].")] = None,
    region: Annotated[str, typer.Option(help="AWS region of the buckets (Terraform output `region`).")] = "eu-west-1",
    role_arn: Annotated[str, typer.Option(help="IAM role of the workflow pods (IRSA; Terraform output).")
                        ] = "arn:aws:iam::123456789012:role/defectops-workflow",
    template_name: Annotated[str, typer.Option(help="Name of the WorkflowTemplate.")] = DEFAULT_TEMPLATE,
    deadline_hours: Annotated[float, typer.Option(help="activeDeadlineSeconds of a workflow, in hours.")] = 24.0,
    retries: Annotated[int, typer.Option(help="Retries of a step after an infrastructure failure.")] = 2,
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 if the files in --out differ.")
                     ] = False,
) -> None:
    """Render the pipeline as an Argo WorkflowTemplate (and its namespace, RBAC, S3 artifact repository).

    Built from the same DAG the local runner uses. Overrides are fixed into the template (`base-overrides`);
    `train.nproc` sets the GPUs of the train pod. Apply with `kubectl apply -f <out>/`.
    """
    from importlib.metadata import PackageNotFoundError, version

    from defectops.core.fsutil import write_text
    from defectops.pipelines.argo.compiler import ArgoSettings, CompileError, check_overrides, render

    ov = list(overrides or [])
    try:
        check_overrides(ov)
    except CompileError as e:
        raise fail(str(e), EXIT_USAGE) from None
    cfg = load(ov)
    if (w := _local_registry_warning(cfg)) is not None:
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    if tag is None:
        try:
            tag = version("defectops")
        except PackageNotFoundError:
            tag = "latest"
    settings = ArgoSettings(namespace=namespace, template_name=template_name, image=image, tag=tag, bucket=bucket,
                            prefix=prefix.rstrip("/"), artifact_bucket=artifact_bucket, region=region,
                            role_arn=role_arn,
                            deadline_seconds=round(deadline_hours * 3600), retry_limit=retries
                            ).with_overrides(ov, cfg.train.nproc)
    try:
        files = render(settings)
    except CompileError as e:
        raise fail(str(e), EXIT_USAGE) from None
    if check:
        stale = [n for n, text in files.items()
                 if not (out / n).is_file() or (out / n).read_text(encoding="utf-8") != text]
        if stale:
            raise fail(f"{out} is out of date ({', '.join(stale)}): rerun defectops compile", EXIT_FAILURE)
        console.print(f"{out}: up to date")
        return
    for name, text in files.items():
        write_text(out / name, text)
        console.print(f"wrote {out / name}", highlight=False)
    console.print(f"train: {settings.nproc} GPU(s) per pod; apply with: kubectl apply -f {out}/", highlight=False)


# --- submit --------------------------------------------------------------------------------------------------------

def submit(
    overrides: Overrides = None,
    namespace: Namespace = DEFAULT_NAMESPACE,
    template: Annotated[str, typer.Option(help="WorkflowTemplate to run.")] = DEFAULT_TEMPLATE,
    image: Annotated[str | None, typer.Option(help="Image instead of the template's.")] = None,
    tag: Annotated[str | None, typer.Option(help="Image tag instead of the template's.")] = None,
    bucket: Annotated[str | None, typer.Option(help="Run-root bucket instead of the template's.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Run-root prefix instead of the template's.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the Workflow manifest; contact no server.")
                       ] = False,
    insecure: Insecure = False,
) -> None:
    """Submit a Workflow from the WorkflowTemplate to the Argo Server; prints its name and UI link.

    The template must be compiled and applied (`defectops compile`). Overrides apply after the template's own
    (`base-overrides`). `defectops status <name>` follows the workflow.
    """
    from defectops.pipelines.argo.compiler import (
        CompileError,
        template_nproc,
        template_parameter,
        workflow_from_template,
    )

    ov = list(overrides or [])
    params = {k: v for k, v in (("image", image), ("tag", tag), ("bucket", bucket),
                                ("prefix", prefix.rstrip("/") if prefix else None)) if v}
    try:
        manifest = workflow_from_template(namespace=namespace, template=template, overrides=ov,
                                          submitted_by=_user(), parameters=params)
    except CompileError as e:
        raise fail(str(e), EXIT_USAGE) from None
    if dry_run:
        from defectops.pipelines.argo.compiler import dump_yaml

        load(ov)  # overrides must compose
        console.print(dump_yaml(manifest), highlight=False, markup=False, end="")
        return
    client = _client(insecure)
    try:
        tmpl = client.request("GET", f"/api/v1/workflow-templates/{_q(namespace, template)}",
                              what=f"read WorkflowTemplate {template} in namespace {namespace}")
    except ArgoError as e:
        if "(404)" in str(e):
            raise fail(f"WorkflowTemplate {template} not found in namespace {namespace}: render and apply it first "
                       f"(defectops compile --out deploy/argo && kubectl apply -f deploy/argo/)", EXIT_FAILURE) \
                from None
        raise fail(str(e), EXIT_FAILURE) from None
    base = (template_parameter(tmpl, "base-overrides") or "").split()
    cfg = load(base + ov)
    nproc = template_nproc(tmpl)
    if nproc is not None and cfg.train.nproc != nproc:
        raise fail(f"train.nproc={cfg.train.nproc} but WorkflowTemplate {template} was compiled for {nproc} GPU(s): "
                   f"recompile (defectops compile train.nproc={cfg.train.nproc} ...) and apply it", EXIT_USAGE)
    if (w := _local_registry_warning(cfg)) is not None:
        raise fail(w, EXIT_USAGE)
    try:
        created = client.request("POST", f"/api/v1/workflows/{_q(namespace)}",
                                 {"namespace": namespace, "workflow": manifest},
                                 what=f"create workflows in namespace {namespace}")
    except ArgoError as e:
        raise fail(str(e), EXIT_FAILURE) from None
    name = (created.get("metadata") or {}).get("name")
    if not name:
        raise fail(f"Argo Server {client.base} accepted the workflow but returned no name", EXIT_FAILURE)
    console.print(f"submitted {name} (namespace {namespace}, template {template})", highlight=False)
    console.print(client.ui_link(namespace, name), highlight=False, soft_wrap=True)
    console.print(f"follow it with: defectops status {name} --wait", highlight=False)


# --- status --------------------------------------------------------------------------------------------------------

def _ts(v: str) -> datetime | None:
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")) if v else None
    except ValueError:
        return None


def _duration(start: str, end: str) -> str:
    a, b = _ts(start), _ts(end)
    if a is None:
        return "-"
    secs = int(((b or datetime.now(a.tzinfo)) - a).total_seconds())
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s"


def status(
    name: Annotated[str, typer.Argument(help="Workflow name (printed by `defectops submit`).")],
    namespace: Namespace = DEFAULT_NAMESPACE,
    wait: Annotated[bool, typer.Option("--wait", help="Poll until the workflow finishes.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the phases as JSON.")] = False,
    insecure: Insecure = False,
) -> None:
    """Show a workflow's phase and each step's phase, attempts, duration and error line.

    Exit code: 0 succeeded or still running, 3 a gate failed, 1 any other failure (or the server failed)."""
    from defectops.pipelines.argo.compiler import error_line, step_nodes

    client = _client(insecure)
    while True:
        try:
            wf = client.request("GET", f"/api/v1/workflows/{_q(namespace, name)}",
                                what=f"read workflow {name} in namespace {namespace}")
        except ArgoError as e:
            msg = str(e)
            if "(404)" in msg:
                msg = f"workflow {name} not found in namespace {namespace} (deleted by its ttlStrategy, or a typo?)"
            raise fail(msg, EXIT_FAILURE) from None
        st = wf.get("status") or {}
        phase = st.get("phase") or "Pending"
        if not wait or phase in FINISHED:
            break
        time.sleep(max(interval, 0.05))
    rows = step_nodes(wf)
    gate = any(r["kind"] == "gates" for r in rows)
    if as_json:
        console.print_json(json.dumps({"name": name, "namespace": namespace, "phase": phase,
                                       "message": st.get("message"), "progress": st.get("progress"),
                                       "gate_failure": gate, "steps": rows, "ui": client.ui_link(namespace, name)}))
    else:
        console.print(f"[bold]{escape(name)}[/] {escape(phase)}  progress {escape(str(st.get('progress', '-')))}  "
                      f"duration {_duration(st.get('startedAt') or '', st.get('finishedAt') or '')}")
        if st.get("message"):
            console.print(f"message: {escape(str(st['message']))}", soft_wrap=True)
        t = Table("step", "phase", "attempts", "duration", "detail")
        colours = {"Succeeded": "green", "Failed": "red", "Error": "red", "Running": "cyan"}
        for r in rows:
            c = colours.get(r["phase"], "yellow")
            detail = ("GATE FAILURE: " if r["kind"] == "gates" else "") + error_line(r["message"])
            t.add_row(escape(r["name"]), f"[{c}]{escape(r['phase'])}[/]", str(r["attempts"]),
                      _duration(r["started"], r["finished"]), escape(detail[:200]))
        console.print(t)
        if gate:
            console.print("[red]the model failed its evaluation gates:[/] registered for traceability, not promoted")
        console.print(client.ui_link(namespace, name), highlight=False, soft_wrap=True)
    if phase in ("Failed", "Error"):
        raise typer.Exit(EXIT_GATES if gate else EXIT_FAILURE)


# --- the exit handler's report (runs in the workflow's last pod) ---------------------------------------------------

def argo_report(
    workflow: Annotated[str, typer.Option(help="{{workflow.name}}")],
    status_: Annotated[str, typer.Option("--status", help="{{workflow.status}}")],
    failures: Annotated[str, typer.Option(help="{{workflow.failures}} (JSON)")] = "",
    run_root: Annotated[str, typer.Option(help="The run root.")] = "",
) -> None:
    """Print one clear line per failed step of a finished workflow (Argo exit handler)."""
    from defectops.pipelines.argo.compiler import failure_report

    text, _ = failure_report(workflow, status_, failures, run_root)
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """``defectops compile``, ``submit`` and ``status`` (and the workflow's own ``argo-report``)."""
    app.command("compile")(compile_cmd)
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("argo-report", hidden=True)(argo_report)
