"""``defectops run|step|steps|config show|ui``: the pipeline locally, one step at a time, and the MLflow UI.

Exit codes (stable, for CI): 0 success; 1 a step failed (the message names the step and the cause); 2 usage or
configuration error; 3 the model failed its evaluation gates (it is registered for traceability, not promoted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from defectops.core.layout import RUN
from defectops.pipelines.cli.common import (
    EXIT_FAILURE,
    EXIT_GATES,
    EXIT_USAGE,
    Overrides,
    RichReporter,
    console,
    fail,
    load,
    progress_bars,
)


def run(overrides: Overrides = None) -> None:
    """Run the whole pipeline: pull_data -> validate_data -> train -> evaluate -> register -> export -> verify_export.

    Everything lives under $DEFECTOPS_HOME (default ./defectops-home): runs/<run-id>/, the MLflow database and its
    artifacts. The run id is derived from the configuration, so rerunning the same command resumes an interrupted run
    (completed steps are skipped, training continues from its last checkpoint).
    """
    from defectops.pipelines.config import home_dir
    from defectops.pipelines.context import StepError
    from defectops.pipelines.runners.local import RunError, run_pipeline

    cfg = load(overrides)
    home = home_dir()
    with progress_bars() as progress:
        reporter = RichReporter(progress)

        def on_step(step: Any, outcome: Any) -> None:
            reporter.clear()
            if outcome == "start":
                progress.console.print(f"[bold cyan]▶ {step.name}[/] [dim]{step.summary}[/]")
            elif outcome.status == "skipped":
                progress.console.print("  [dim]already complete, skipped[/]")
            else:
                progress.console.print(f"  [green]✓ {step.name}[/] in {outcome.seconds:.1f} s")
        try:
            ctx, _ = run_pipeline(cfg, home=home, reporter=reporter, on_step=on_step)
        except StepError as e:
            raise fail(str(e), EXIT_USAGE) from None
        except RunError as e:
            progress.stop()
            if e.root is not None and (e.root / RUN.summary).is_file():
                _print_results(e.root)
            raise fail(str(e), EXIT_GATES if e.gate_failure else EXIT_FAILURE) from None
    _print_results(ctx.root)


def _with_interval(value: float | None, interval: Any) -> str:
    """``0.987 [0.975, 0.994]`` (the interval when known), ``-`` for no value."""
    if value is None:
        return "-"
    bounds = interval.format_bounds() if interval is not None else ""
    return f"{value:.3f} [dim]{bounds}[/]" if bounds else f"{value:.3f}"


def _print_results(root: Path) -> None:
    from defectops.core.fsutil import read_json
    from defectops.evaluation.intervals import ClassificationIntervals

    s = read_json(root / RUN.summary)
    gates = read_json(root / RUN.gates) if (root / RUN.gates).is_file() else {"results": []}
    m = s["metrics"]
    metrics_full = read_json(root / RUN.metrics) if (root / RUN.metrics).is_file() else {}
    iv = ClassificationIntervals.of_metrics_dict(metrics_full) if metrics_full else None
    t = Table(title="Per-class results (test crops)", title_justify="left",
              caption=escape(f"[brackets]: {100 * iv.confidence:g} % Wilson intervals") if iv else None,
              caption_justify="left")
    t.add_column("class")
    t.add_column("recall", justify="right")
    t.add_column("precision", justify="right")
    order = metrics_full.get("classes") or list(m.get("per_class_recall") or {})
    for cls in order:
        rec = (m.get("per_class_recall") or {}).get(cls)
        prec = (m.get("per_class_precision") or {}).get(cls)
        t.add_row(escape(cls), _with_interval(rec, iv.per_class_recall.get(cls) if iv else None),
                  "-" if prec is None else f"{prec:.3f}")
    console.print(t)
    _print_board_results(root)
    g = Table(title="Gates", title_justify="left")
    for col in ("gate", "value", "threshold", "result"):
        g.add_column(col, justify="right" if col in ("value", "threshold") else "left")
    for r in gates["results"]:
        value = "-" if r.get("value") is None else f"{r['value']:.4f}"
        g.add_row(escape(r["name"]), value, f"{r['comparison']} {r['threshold']}",
                  "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    console.print(g)
    w = Table(title="Where everything is", title_justify="left", show_header=False)
    w.add_column("what")
    w.add_column("value", overflow="fold")
    rows = [("run", s["run_id"]), ("run root", s["run_root"]), ("registered model", f"{s['registered_model']} "
            f"v{s['version']} aliases={','.join(s['aliases']) or '-'}"), ("MLflow", s["tracking_uri"]),
            ("macro recall", _headline(m.get("macro_recall"), iv.macro_recall if iv else None)),
            ("escape rate", _headline(m.get("escape_rate"), iv.escape_rate if iv else None)),
            ("false-call rate", _headline(m.get("false_call_rate"), iv.false_call_rate if iv else None)),
            ("report", str(s["report"])),
            ("ONNX", str(s["onnx_path"])), ("Triton repository", str(s["triton_repository"])),
            ("summary", str(root / RUN.summary))]
    if s.get("onnx_parity"):
        p = s["onnx_parity"]
        if "max_rel_diff" in p:  # an anomaly model: image scores, not logits
            rows.append(("ONNX parity", f"decisions agree {p['top1_agreement']:.4f}, "
                                        f"max relative score diff {p['max_rel_diff']:.2e}"))
        else:
            rows.append(("ONNX parity", f"top-1 agreement {p['top1_agreement']:.4f}, "
                                        f"max |logit diff| {p['max_abs_logit_diff']:.2e}"))
    for k, v in rows:
        w.add_row(k, v)
    console.print(w)


def _headline(value: float | None, interval: Any) -> str:
    """A headline figure with its interval and what the interval is: ``0.940 [0.912, 0.961] (95 % Wilson, n = 100
    defects)``."""
    text = _with_interval(value, interval)
    if interval is not None and interval.defined:
        text += f" [dim]({escape(interval.describe())})[/]"
    return text


def _per_type(board: dict[str, Any]) -> str:
    per = board.get("type_thresholds") or {}
    return f" (per type: {', '.join(f'{k} {v}' for k, v in per.items())})" if per else ""


def _print_board_results(root: Path) -> None:
    """The board-level DeepPCB scores per split with their bootstrap intervals, and per board design."""
    from defectops.core.fsutil import read_json
    from defectops.evaluation.intervals import Interval

    if not (root / RUN.board_metrics).is_file():
        return
    board = read_json(root / RUN.board_metrics)
    t = Table(title="Board-level detection (DeepPCB metric)", title_justify="left", caption_justify="left",
              caption=escape(f"score threshold {board.get('score_threshold')}{_per_type(board)} chosen on val; "
                             f"[brackets]: bootstrap over boards; * worst design (lowest F-score)"))
    for col in ("split", "design", "boards", "mAP", "F-score"):  # precision and recall: board_metrics.json, report
        t.add_column(col, justify="left" if col in ("split", "design") else "right", no_wrap=True)
    for split in ("val", "test"):
        b = board.get(split)
        if not b:
            continue
        ivs = {k: Interval.from_dict(v) for k, v in (b.get("intervals") or {}).items()}
        t.add_row(split, "[bold]all[/]", str(b["boards"]), _with_interval(b["map"], ivs.get("map")),
                  _with_interval(b["fscore"], ivs.get("fscore")))
        groups = b.get("per_group") or {}
        worst = (b.get("worst_group") or {}).get("group")
        for g, pg in groups.items():
            name = escape(g) + ("[red]*[/]" if g == worst and len(groups) > 1 else "")
            t.add_row("", name, str(pg["boards"]), f"{pg['map']:.3f}", f"{pg['fscore']:.3f}")
    console.print(t)


def step(
    name: Annotated[str, typer.Argument(help="Step to run: pull_data, validate_data, train, evaluate, register, "
                                              "export, verify_export.")],
    run_root: Annotated[str, typer.Option("--run-root", help="The run's folder (created if missing), or "
                                                             "s3://bucket/prefix: mirrored to $DEFECTOPS_HOME/"
                                                             "remote-runs before the step and back after it.")],
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option(help="Run even if the step already completed in this run root.")] = False,
) -> None:
    """Run one step of the DAG against a run root (what an Argo pod calls).

    The run root's config.yaml (written by its first step) is the configuration; overrides are only accepted when
    the run root is new. With an s3:// run root the step works on a local mirror: objects that are missing or differ
    are downloaded first, and what changed is uploaded afterwards (step markers last), also when the step fails.
    """
    from defectops.pipelines.config import from_yaml, home_dir
    from defectops.pipelines.context import StepError
    from defectops.pipelines.dag import STEP_NAMES
    from defectops.pipelines.runners.local import RunError, run_single
    from defectops.pipelines.runners.remote_root import is_remote, local_mirror, pull_root, push_root
    from defectops.training.remote import RemoteError

    if name not in STEP_NAMES:
        raise fail(f"unknown step {name!r}: choose one of {', '.join(STEP_NAMES)}", EXIT_USAGE)
    home = home_dir()
    remote = is_remote(run_root)
    if remote:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise fail("an s3:// run root cannot be mirrored from inside torchrun: run `defectops step train "
                       "--run-root s3://...` as one process (with train.nproc > 1 it starts torchrun itself)",
                       EXIT_USAGE)
        root = local_mirror(run_root, home)
        try:
            got = pull_root(run_root, root)
        except RemoteError as e:
            raise fail(str(e), EXIT_FAILURE) from None
        console.print(f"run root {escape(run_root)} mirrored to {root} ({got.transferred} files fetched, "
                      f"{got.skipped} up to date)")
    else:
        root = Path(run_root)
    try:
        cfg_file = root / RUN.config
        reuse = cfg_file.is_file() and not overrides
        cfg = from_yaml(cfg_file.read_text(encoding="utf-8")) if reuse else load(overrides)
        with progress_bars() as progress:
            try:
                outcome = run_single(name, cfg, root.resolve(), home=home, reporter=RichReporter(progress),
                                     force=force)
            except StepError as e:
                raise fail(str(e), EXIT_USAGE) from None
            except RunError as e:
                raise fail(str(e), EXIT_GATES if e.gate_failure else EXIT_FAILURE) from None
    finally:
        if remote and root.is_dir():
            try:
                sent = push_root(root, run_root)
            except RemoteError as e:
                raise fail(f"step {name} ran but its outputs could not be uploaded: {e}", EXIT_FAILURE) from None
            console.print(f"run root {escape(run_root)} updated ({sent.transferred} files uploaded)")
    console.print(f"[green]✓ {name}[/] {outcome.status} ({outcome.seconds:.1f} s)")


def list_steps() -> None:
    """List the DAG's steps in order with the config groups each one reads."""
    from defectops.pipelines.dag import DAG

    t = Table("step", "reads", "what it does")
    for s in DAG:
        t.add_row(s.name, ", ".join(s.config_params), s.summary)
    console.print(t)


def config_show(overrides: Overrides = None) -> None:
    """Print the resolved configuration (after overrides) as YAML, and the run id it maps to."""
    from defectops.pipelines.config import run_id, to_yaml

    cfg = load(overrides)
    console.print(to_yaml(cfg), highlight=False, markup=False)
    console.print(f"# run id: {run_id(cfg)}", highlight=False, markup=False)


def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless behind a proxy.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on this home's registry (runs, metrics, model versions, aliases)."""
    from defectops.pipelines.config import home_dir

    home = home_dir()
    db = home / "mlflow.db"
    if not db.is_file():
        raise fail(f"no registry at {db} yet: run `defectops run` first (or set DEFECTOPS_HOME)", EXIT_USAGE)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", host,
           "--port", str(port)]
    console.print(f"MLflow UI on http://{host}:{port} (Ctrl-C to stop)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    raise typer.Exit(subprocess.call(cmd, env=env))


def register(app: typer.Typer) -> None:
    """``run``, ``step``, ``steps``, ``config show`` and ``ui``."""
    app.command()(run)
    app.command()(step)
    app.command("steps")(list_steps)
    config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
    config_app.command("show")(config_show)
    app.add_typer(config_app, name="config")
    app.command()(ui)
