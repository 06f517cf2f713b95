"""What every step receives besides its sub-configs: the run identity, the run root and a progress reporter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Advance = Callable[[int], None]


class Reporter:
    """Progress sink; the CLI plugs rich progress bars in (a subclass), tests and pods use this silent default."""

    def task(self, description: str, total: int | None) -> Advance:
        return lambda n: None

    def log(self, message: str) -> None:
        """A line for the user; one starting with ``WARNING`` is advice the CLI shows prominently."""


@dataclass
class StepContext:
    run_id: str
    root: Path
    home: Path
    config_hash: str
    reporter: Reporter = field(default_factory=Reporter)

    def path(self, rel: str) -> Path:
        return self.root / rel


class StepError(RuntimeError):
    """A step failed for a reason the user can act on (message is one line)."""


class GateFailure(StepError):
    """The model was evaluated and registered for traceability but failed its gates."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed
