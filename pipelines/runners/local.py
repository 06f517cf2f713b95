"""The local runner: executes the DAG in order in one process, with resume.

A step that completes writes ``steps/<name>.json`` (its result) atomically; a rerun skips completed steps, so a
killed run continues where it stopped (training resumes from its newest checkpoint). The first failure stops the run
with the step's name and cause. ``summary.json`` is written at the end of every run that reaches ``register``.

Under torchrun (a distributed train step) only rank 0 writes step markers; :mod:`pipelines.runners.worker` is the
per-process entry point the train step starts under torchrun when ``train.nproc`` > 1.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectops.core.fsutil import read_json, write_json, write_text
from defectops.core.layout import RUN
from defectops.pipelines.config import DefectOpsConfig, config_hash, home_dir, run_id, to_yaml, tracking_uri
from defectops.pipelines.context import GateFailure, Reporter, StepContext, StepError
from defectops.pipelines.dag import DAG, Step, get_step
from defectops.training.distributed import env_info

SUMMARY = RUN.summary


class RunError(RuntimeError):
    """A run stopped: ``step`` names where, the message says why."""

    def __init__(self, step: str, message: str, *, gate_failure: bool = False) -> None:
        super().__init__(f"step {step} failed: {message}")
        self.step = step
        self.gate_failure = gate_failure
        self.root: Path | None = None


@dataclass
class StepOutcome:
    name: str
    status: str  # "done", "skipped", "failed"
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)
    """The step's result as recorded in its marker (:meth:`StepResult.to_dict`; read back for a skipped step)."""


def ensure_home(home: Path) -> Path:
    try:
        (home / "runs").mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StepError(f"DEFECTOPS_HOME {home} is not writable ({e.strerror}): set DEFECTOPS_HOME to a writable "
                        f"folder") from None
    return home


def prepare_run_root(cfg: DefectOpsConfig, home: Path, root: Path | None = None) -> StepContext:
    """Create (or reopen) the run root and pin its configuration; a different config in the same root is an error."""
    ensure_home(home)
    rid = run_id(cfg)
    root = root or home / "runs" / rid
    chash = config_hash(cfg)
    meta_path = root / "run.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        if meta.get("config_hash") != chash:
            raise StepError(f"run root {root} holds a run with a different configuration: choose another run.id, "
                            f"or remove {root}")
        rid = meta["run_id"]
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_text(root / RUN.config, to_yaml(cfg))
        write_json(meta_path, {"run_id": rid, "config_hash": chash, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return StepContext(run_id=rid, root=root, home=home, config_hash=chash)


def marker(ctx: StepContext, name: str) -> Path:
    return ctx.root / RUN.marker(name)


def run_step(step: Step, ctx: StepContext, cfg: DefectOpsConfig, *, force: bool = False) -> StepOutcome:
    m = marker(ctx, step.name)
    if m.is_file() and not force:
        return StepOutcome(step.name, "skipped", 0.0, read_json(m).get("result", {}))
    t0 = time.perf_counter()
    try:
        result = step(ctx, cfg).to_dict()
    except GateFailure as e:
        raise RunError(step.name, str(e), gate_failure=True) from e
    except (StepError, FileNotFoundError, ValueError) as e:
        raise RunError(step.name, str(e)) from e
    seconds = time.perf_counter() - t0
    if env_info().is_main:  # under torchrun, rank 0 alone records the step
        write_json(m, {"step": step.name, "seconds": seconds, "result": result,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return StepOutcome(step.name, "done", seconds, result)


def run_pipeline(cfg: DefectOpsConfig, *, home: Path | None = None, reporter: Reporter | None = None,
                 on_step: Any = None) -> tuple[StepContext, list[StepOutcome]]:
    """Run every step in order; raises :class:`RunError` at the first failure (after writing the summary)."""
    ctx = prepare_run_root(cfg, home or home_dir())
    ctx.reporter = reporter or Reporter()
    outcomes: list[StepOutcome] = []
    try:
        for step in DAG:
            if on_step:
                on_step(step, "start")
            outcome = run_step(step, ctx, cfg)
            outcomes.append(outcome)
            if on_step:
                on_step(step, outcome)
    except RunError as e:
        e.root = ctx.root
        if (ctx.root / RUN.registration).is_file():
            write_summary(ctx, cfg)
        raise
    write_summary(ctx, cfg)
    return ctx, outcomes


def write_summary(ctx: StepContext, cfg: DefectOpsConfig) -> dict[str, Any]:
    """Collect what a user needs to find everything the run made into ``summary.json``."""
    reg = read_json(ctx.root / RUN.registration) if (ctx.root / RUN.registration).is_file() else {}
    metrics = read_json(ctx.root / RUN.metrics) if (ctx.root / RUN.metrics).is_file() else {}
    gates = read_json(ctx.root / RUN.gates) if (ctx.root / RUN.gates).is_file() else {}
    snap_meta = ctx.root / RUN.snapshot / "snapshot.json"
    snap = read_json(snap_meta) if snap_meta.is_file() else {}
    parity = read_json(ctx.root / RUN.parity) if (ctx.root / RUN.parity).is_file() else None
    triton = ctx.root / RUN.triton
    summary = {
        "run_id": ctx.run_id,
        "run_root": str(ctx.root),
        "tracking_uri": reg.get("tracking_uri", tracking_uri(cfg.registry, ctx.home)),
        "registered_model": reg.get("registered_model", cfg.registry.model_name),
        "version": reg.get("version"),
        "aliases": _current_aliases(ctx, cfg, reg),
        "gates_passed": gates.get("passed"),
        "failed_gates": [r["name"] for r in gates.get("results", []) if not r.get("passed")],
        "metrics": {k: metrics.get(k) for k in ("accuracy", "macro_recall", "per_class_recall", "per_class_precision",
                                                 "escape_rate", "false_call_rate", "n")},
        "dataset_fingerprint": snap.get("fingerprint"),
        "onnx_path": str(ctx.root / RUN.onnx) if (ctx.root / RUN.onnx).is_file() else None,
        "onnx_parity": parity,
        "triton_repository": str(triton) if triton.is_dir() else None,
        "report": str(ctx.root / RUN.report) if (ctx.root / RUN.report).is_file() else None,
        "steps": {s.name: read_json(marker(ctx, s.name)).get("seconds") for s in DAG if marker(ctx, s.name).is_file()},
    }
    write_json(ctx.root / SUMMARY, summary)
    return summary


def _current_aliases(ctx: StepContext, cfg: DefectOpsConfig, reg: dict[str, Any]) -> list[str]:
    if not reg.get("version"):
        return []
    try:
        from defectops.registry import mlflow_registry as R

        return R.aliases_of(R.client(reg["tracking_uri"]), reg["registered_model"], reg["version"])
    except Exception:  # noqa: BLE001 - the registry may be unreachable: the summary keeps the recorded aliases
        return list(reg.get("aliases", []))


def run_single(name: str, cfg: DefectOpsConfig, root: Path, *, home: Path | None = None,
               reporter: Reporter | None = None, force: bool = False) -> StepOutcome:
    """Run one step against an existing or new run root (what an Argo pod calls)."""
    step = get_step(name)
    ctx = prepare_run_root(cfg, home or home_dir(), root=root)
    ctx.reporter = reporter or Reporter()
    outcome = run_step(step, ctx, cfg, force=force)
    if name == DAG[-1].name:
        write_summary(ctx, cfg)
    return outcome
