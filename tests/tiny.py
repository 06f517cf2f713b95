"""The typed result of the session's tiny end-to-end run (the ``tiny_run`` fixture in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectops.pipelines.config import DefectOpsConfig
from defectops.pipelines.context import StepContext


@dataclass(frozen=True)
class TinyRun:
    """``+experiment=tiny`` run once per session in a fresh home: its home (registry), config, context, step outcomes
    and run root. Tests read what it left behind and must not change it."""

    home: Path
    cfg: DefectOpsConfig
    ctx: StepContext
    outcomes: list[Any]
    root: Path
