"""``defectops``: the command line. One module per command group, each with ``register(app)``; this module builds the
app from :data:`COMMANDS` in that order (a new command: a module here with ``register``, and an entry below).

Exit codes (stable, for CI): 0 success; 1 a step failed (the message names the step and the cause); 2 usage or
configuration error; 3 the model failed its evaluation gates (it is registered for traceability, not promoted).
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import typer

from defectops.pipelines.cli import argo, bench, data, drift, line, predict, registry, review, run, serve
from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_GATES, EXIT_USAGE, err

__all__ = ["COMMANDS", "EXIT_FAILURE", "EXIT_GATES", "EXIT_USAGE", "app", "main"]

COMMANDS: tuple[ModuleType, ...] = (run, bench, data, drift, predict, registry, review, serve, line, argo)
"""Command modules in registration order (``--help`` lists groups and commands alphabetically)."""

app = typer.Typer(
    name="defectops", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Train, gate, register and export defect-detection models for electronics manufacturing.\n\n"
         "Exit codes: 0 ok, 1 a step failed, 2 usage/config error, 3 gates failed.",
)
for _module in COMMANDS:
    _module.register(app)


def main() -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted: rerun the same command to resume")
        sys.exit(130)
