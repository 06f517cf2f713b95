"""Shared pieces of the ``defectops`` command line: consoles, exit codes, errors, progress and config loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from defectops.pipelines.context import Reporter

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATES = 0, 1, 2, 3

console = Console(stderr=False)
err = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(
    help="Hydra overrides: key=value (e.g. train.epochs=5 model=vit data.synth.n_boards=60), +experiment=tiny.",
    show_default=False)]


def resolve_tracking_uri(given: str | None, home: Path) -> str:
    """The registry a command talks to: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the home's SQLite
    registry (the pipeline's own default, :func:`pipelines.config.tracking_uri`)."""
    from defectops.pipelines.config import tracking_uri
    from defectops.registry.config import RegistryConfig

    return given or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(RegistryConfig(), home)


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load(overrides: list[str] | None) -> Any:
    from defectops.pipelines.config import ConfigError, load_config

    try:
        return load_config(list(overrides or []))
    except ConfigError as e:
        raise fail(str(e), EXIT_USAGE) from None


class RichReporter(Reporter):
    """Progress bars for long work inside steps."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: list[Any] = []

    def task(self, description: str, total: int | None) -> Any:
        tid = self.progress.add_task(f"  {description}", total=total)
        self.tasks.append(tid)
        return lambda n: self.progress.advance(tid, n)

    def clear(self) -> None:
        for tid in self.tasks:
            self.progress.remove_task(tid)
        self.tasks.clear()

    def log(self, message: str) -> None:
        style = "bold yellow" if message.startswith("WARNING") else "dim"  # e.g. the shortcut check's warning
        self.progress.console.print(f"  [{style}]{escape(message)}[/]", highlight=False)


def progress_bars() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)




def image_paths(inputs: list[Path], option: str = "") -> list[Path]:
    """Image files named directly or found (recursively, hidden folders skipped) in folders; usage error if none."""
    from defectops.training.importers import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for p in inputs:
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            paths.append(p)
        else:
            raise fail(f"{option + ' ' if option else ''}{p} does not exist", EXIT_USAGE)
    if not paths:
        raise fail(f"no images found in {option or 'the paths given'}", EXIT_USAGE)
    return paths
