"""The inspection result of one board at the line: what every sink (MQTT, IPC-CFX, webhook, the local log) receives.

One JSON document per board (:meth:`InspectionResult.to_dict`), versioned by ``schema``; every result carries a
``transaction_id`` (uuid4) that receivers de-duplicate on (delivery is at-least-once), and the model name and version
that produced it, so a result can always be traced to the registered version that judged the board.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA = "defectops.line.result/v1"


def utc_now() -> str:
    """ISO-8601 UTC time with milliseconds and ``Z``: ``2026-12-07T14:31:02.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_transaction_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class LineDefect:
    """One defect found on a board: its type (a model class, or ``defect`` for a type-agnostic anomaly box), box in the
    tested image's pixels, confidence in [0, 1], the board region it lies in and, when known, the designator."""

    type: str
    box: tuple[float, float, float, float]
    confidence: float
    location: str
    designator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = [round(float(v), 1) for v in self.box]
        d["confidence"] = round(float(self.confidence), 6)
        return d


@dataclass(frozen=True)
class ModelInfo:
    """Which registered model judged the board."""

    name: str
    version: str
    task: str
    source: str = ""
    good_class: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "task": self.task, "good_class": self.good_class}


@dataclass(frozen=True)
class InspectionResult:
    """One board's verdict: pass/fail, its defects, the model, timing and where the image is kept."""

    transaction_id: str
    unit_id: str
    line_id: str
    site: str
    model: ModelInfo
    result: str  # "pass" | "fail"
    started: str
    finished: str
    latency_ms: float
    image: str
    defects: tuple[LineDefect, ...] = ()
    position: int | None = None
    score: float | None = None  # an anomaly model's raw image score
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "transaction_id": self.transaction_id, "unit_id": self.unit_id,
                "line_id": self.line_id, "site": self.site, "position": self.position, "model": self.model.to_dict(),
                "result": self.result, "started": self.started, "finished": self.finished,
                "latency_ms": round(self.latency_ms, 3), "image": self.image,
                "defects": [d.to_dict() for d in self.defects],
                **({"score": round(self.score, 6)} if self.score is not None else {}), **self.extra}
