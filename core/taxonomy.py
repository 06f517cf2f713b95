"""The defect taxonomy and the box type every package speaks (DeepPCB's six defect types, an inclusive pixel box), and
the kinds of task a run can train.

Why here: real-data importers, candidate generation, the board detector and the metrics all need the types and the box;
the synthetic generator is only one producer of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DEFECT_TYPES: tuple[str, ...] = ("open", "short", "mousebite", "spur", "copper", "pin-hole")  # DeepPCB ids 1..6
NUISANCE_LABEL = "nuisance"


@dataclass(frozen=True)
class Box:
    """Inclusive pixel box ``(x1, y1)``-``(x2, y2)`` with a label from DEFECT_TYPES (or ``"nuisance"``)."""

    x1: int
    y1: int
    x2: int
    y2: int
    label: str


class TaskKind(StrEnum):
    """What a run trains (config ``task``); each kind is a :class:`pipelines.tasks.Task` implementation."""

    verify = "verify"  # AOI candidate verification: board pairs -> candidate crops -> false call or defect type
    classify = "classify"  # folder-per-class image classification
    anomaly = "anomaly"  # an anomaly model fitted on good samples only (PatchCore)
