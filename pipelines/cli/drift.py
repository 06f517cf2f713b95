"""``defectops drift check``: has production drifted from what the model was validated on? (``docs/drift.md``)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from defectops.pipelines.cli.common import (
    EXIT_FAILURE,
    EXIT_GATES,
    EXIT_USAGE,
    console,
    err,
    fail,
    resolve_tracking_uri,
)

EXIT_DRIFT = EXIT_GATES  # 3: drift detected

drift_app = typer.Typer(
    help="Detect drift of production images from a model's reference profile.\n\n"
         "Exit codes: 0 no drift, 3 drift, 2 usage error, 1 failure.", no_args_is_help=True)


@drift_app.command("check")
def check_cmd(
    model: Annotated[str, typer.Option("--model", help="models:/<name>@<alias> | models:/<name>/<version> | a run "
                                                       "root. Its reference profile (drift/ of the version's run) is "
                                                       "the baseline.")],
    images: Annotated[str, typer.Option("--images", help="A folder of production images (for AOI models: candidate "
                                                         "crops as the candidate step writes them) or "
                                                         "s3://bucket/prefix.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (the report) on stdout.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write an HTML report with plots here.")] = None,
    alpha: Annotated[float, typer.Option(help="Family-wise false-alarm rate (Bonferroni over the signals).")] = 0.01,
    permutations: Annotated[int, typer.Option(help="Permutations of the embedding MMD test (>= signals/alpha, or "
                                                   "the embeddings alone can never flag drift).")] = 2000,
    min_psi: Annotated[float, typer.Option(help="Smallest PSI for an image statistic to count as drifted.")] = 0.1,
    max_images: Annotated[int, typer.Option(help="Check a seeded random sample of at most this many images.")
                          ] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of the sampling and the permutations.")] = 0,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                          "the SQLite registry in $DEFECTOPS_HOME).")] = None,
    submit_retrain: Annotated[bool, typer.Option("--submit-retrain", help="On drift, submit the pipeline like "
                                                 "`defectops submit` (a dry run printing the Workflow when "
                                                 "ARGO_SERVER is not set), pinning the data snapshot and recording "
                                                 "the drift report.")] = False,
    retrain_data: Annotated[str | None, typer.Option(help="Snapshot for the retrain (folder or s3://bucket/prefix"
                                                          "[@fingerprint]) [default: the model's own snapshot "
                                                          "source, pinned to its latest fingerprint].")] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", envvar="ARGO_NAMESPACE",
                                           help="Namespace of the retrain workflow.")] = "defectops",
    template: Annotated[str, typer.Option(help="WorkflowTemplate of the retrain.")] = "defectops-pipeline",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load a version registered in the old pickled "
                                               "MLflow PyTorch format (unpickling runs code from the artifact store: "
                                               "only for a store you trust). Default: refused.")] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help="Extra overrides for the retrain (key=value).",
                                                          show_default=False)] = None,
) -> None:
    """Compare a batch of production images with the model's reference profile.

    Signals: KS test + PSI per image statistic (mean, contrast, sharpness, foreground ratio per channel), an MMD
    permutation test on penultimate-layer embeddings, a chi-square test of the prediction mix and a KS test of the
    confidence. Drift when any signal's p-value < alpha / (number of signals).

    Exit codes (stable, for CI): 0 no drift, 3 drift (and, with --submit-retrain, the retrain was submitted),
    2 usage error (bad option, unknown model, no reference profile, no images), 1 failure (the check or the
    submission could not be carried out).
    """
    from defectops.pipelines.config import home_dir
    from defectops.pipelines.drift import DriftFailure, DriftUsageError, check, load_batch, load_checked_model

    if not 0.0 < alpha < 1.0:
        raise fail(f"--alpha must be in (0, 1), got {alpha}", EXIT_USAGE)
    if permutations < 1 or max_images < 2:
        raise fail("--permutations must be >= 1 and --max-images >= 2", EXIT_USAGE)
    home = home_dir()
    uri = resolve_tracking_uri(tracking_uri, home)
    try:
        m = load_checked_model(model, tracking_uri=uri, cache_dir=home / "cache", allow_pickle=allow_pickle or None)
        pixels, found = load_batch(images, m.meta, max_images=max_images, seed=seed)
        drift, batch = check(m, pixels, alpha=alpha, n_perm=permutations, seed=seed, min_psi=min_psi)
    except DriftUsageError as e:
        raise fail(str(e), EXIT_USAGE) from None
    except DriftFailure as e:
        raise fail(str(e), EXIT_FAILURE) from None
    except (OSError, ValueError) as e:
        raise fail(f"drift check failed: {e}", EXIT_FAILURE) from None
    doc: dict[str, Any] = {"model": m.source, "version": m.version, "images": images, "images_found": found,
                           **drift.to_dict()}
    if report is not None:
        from defectops.evaluation.drift_report import render_drift_report, report_info

        try:
            render_drift_report(report, drift, m.reference, batch,
                                info=report_info(m.source, images, found, batch.size, m.meta))
        except OSError as e:
            raise fail(f"cannot write the report {report}: {e}", EXIT_FAILURE) from None
        doc["report"] = str(report)
    if drift.drifted and submit_retrain:
        doc["retrain"] = _submit_retrain(m, doc, images, retrain_data, namespace, template, list(overrides or []),
                                         quiet=as_json)
    if as_json:
        print(json.dumps(doc, sort_keys=True))
    else:
        _print_table(doc, drift)
    raise typer.Exit(EXIT_DRIFT if drift.drifted else 0)


def _print_table(doc: dict[str, Any], drift: Any) -> None:
    t = Table(title=f"Drift check: {escape(doc['model'])} vs {escape(doc['images'])} ({drift.n_batch} images, "
                    f"reference {drift.n_reference})", title_justify="left")
    for col in ("signal", "test", "statistic", "p-value", "effect", "result"):
        t.add_column(col, justify="right" if col in ("statistic", "p-value", "effect") else "left")
    for s in drift.signals:
        effect = "-" if s.effect is None else f"{s.effect_name} {s.effect:.3g}"
        t.add_row(escape(s.name), escape(s.test), f"{s.statistic:.4g}", f"{s.p_value:.2e}", escape(effect),
                  "[red]DRIFT[/]" if s.drifted else "[green]ok[/]")
    console.print(t)
    colour = "red" if drift.drifted else "green"
    console.print(f"[{colour}]{escape(drift.summary())}[/] (alpha {drift.alpha:g}, Bonferroni over "
                  f"{len(drift.signals)} signals)")
    if doc.get("report"):
        console.print(f"report: {doc['report']}", highlight=False)


def _submit_retrain(m: Any, doc: dict[str, Any], images: str, data: str | None, namespace: str, template: str,
                    extra: list[str], *, quiet: bool) -> dict[str, Any]:
    """Submit the retrain through `defectops submit`'s code path (its manifest, client and checks), with the drift
    report as an annotation of the Workflow and, once it has a name, uploaded into the new run root
    (``trigger/drift-report.json``; the register step keeps it under ``drift/`` of the new version's run)."""
    from defectops.pipelines.argo.client import ArgoError
    from defectops.pipelines.argo.compiler import (
        CompileError,
        dump_yaml,
        label_value,
        template_parameter,
        workflow_from_template,
    )
    from defectops.pipelines.cli.argo import _client, _local_registry_warning, _q, _user
    from defectops.pipelines.cli.common import load
    from defectops.pipelines.drift import DriftFailure, DriftUsageError, report_annotation, retrain_overrides

    dry_run = not os.environ.get("ARGO_SERVER", "").strip()
    try:
        ov = retrain_overrides(m.meta, data, resolve_latest=True) + extra
    except DriftUsageError as e:
        raise fail(str(e), EXIT_USAGE) from None
    except DriftFailure as e:
        raise fail(str(e), EXIT_FAILURE) from None
    try:
        manifest = workflow_from_template(namespace=namespace, template=template, overrides=ov,
                                          submitted_by=_user(), generate_name="defectops-retrain-")
    except CompileError as e:
        raise fail(str(e), EXIT_USAGE) from None
    meta = manifest["metadata"]
    meta["labels"]["defectops.io/trigger"] = "drift"
    meta["labels"]["defectops.io/model"] = label_value(str(m.version.get("name") or m.meta.get("run_id") or ""))
    meta["annotations"] = {"defectops.io/drift-report": report_annotation(doc, m, images),
                           "workflows.argoproj.io/description": f"retrain after drift of {m.source}"[:250]}
    if dry_run:
        load(ov)  # overrides must compose
        out = err if quiet else console
        out.print("ARGO_SERVER is not set: dry run, the Workflow that would be submitted:", highlight=False)
        out.print(dump_yaml(manifest), highlight=False, markup=False, end="")
        return {"submitted": False, "dry_run": True, "overrides": ov, "manifest": manifest}
    client = _client(False)
    try:
        tmpl = client.request("GET", f"/api/v1/workflow-templates/{_q(namespace, template)}",
                              what=f"read WorkflowTemplate {template} in namespace {namespace}")
        base = (template_parameter(tmpl, "base-overrides") or "").split()
        cfg = load(base + ov)
        if (w := _local_registry_warning(cfg)) is not None:
            raise fail(w, EXIT_USAGE)
        created = client.request("POST", f"/api/v1/workflows/{_q(namespace)}",
                                 {"namespace": namespace, "workflow": manifest},
                                 what=f"create workflows in namespace {namespace}")
    except ArgoError as e:
        raise fail(f"retrain not submitted: {e}", EXIT_FAILURE) from None
    name = (created.get("metadata") or {}).get("name") or ""
    result: dict[str, Any] = {"submitted": True, "dry_run": False, "workflow": name, "overrides": ov,
                              "ui": client.ui_link(namespace, name) if name else ""}
    bucket, prefix = template_parameter(tmpl, "bucket"), template_parameter(tmpl, "prefix")
    if name and bucket:
        key = "/".join(x for x in ((prefix or "").strip("/"), name, "trigger", "drift-report.json") if x)
        try:
            from defectops.training.remote import s3_client

            s3_client().put_object(Bucket=bucket, Key=key, Body=json.dumps(doc, sort_keys=True).encode(),
                                   ContentType="application/json")
            result["report_uri"] = f"s3://{bucket}/{key}"
        except Exception as e:  # noqa: BLE001 - the workflow runs anyway; its annotation still carries the summary
            err.print(f"[yellow]warning:[/] drift report not uploaded to s3://{bucket}/{key}: {escape(str(e)[:200])}")
    if not quiet:
        console.print(f"retrain submitted: {name} (namespace {namespace}) {result['ui']}", highlight=False)
    return result


def register(app: typer.Typer) -> None:
    """``defectops drift ...``."""
    app.add_typer(drift_app, name="drift")
