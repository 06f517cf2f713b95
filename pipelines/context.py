"""What every step receives besides its sub-configs: the run identity, the run root and a progress reporter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

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


@dataclass(frozen=True)
class StepResult:
    """Base of every step's typed result (each step module defines its own). The runner records ``to_dict()`` in the
    step marker (``RUN.marker(step)``); optional parts left ``None`` are omitted there."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Self:
        """Read a recorded result back (unknown keys are ignored, so older markers still load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


class StepError(RuntimeError):
    """A step failed for a reason the user can act on (message is one line)."""


class GateFailure(StepError):
    """The model was evaluated and registered for traceability but failed its gates."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed
