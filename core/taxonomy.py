"""The defect taxonomy and the box type every package speaks: DeepPCB's six defect types and an inclusive pixel box.

Why here: real-data importers, candidate generation, the board detector and the metrics all need the types and the box;
the synthetic generator is only one producer of them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
