"""The one scoring sequence every evaluated artifact goes through: logits on the test crops -> class probabilities ->
metrics -> gates (with the board-level scores, when there are boards) -> intervals.

Why one function: the evaluate step scores the PyTorch checkpoint, verify_export the ONNX export and the INT8 check
its quantized copy; the same gates must mean the same thing for all three. Pure: arrays in, a dataclass out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectops.evaluation.gates import GateConfig, GateReport, evaluate_gates
from defectops.evaluation.intervals import ClassificationIntervals, metrics_intervals
from defectops.evaluation.metrics import ClassificationMetrics, classification_metrics
from defectops.training.engine import softmax


@dataclass(frozen=True)
class Scored:
    """An artifact's scores on the test crops: probabilities, metrics with intervals, and the gate verdict."""

    probs: np.ndarray
    metrics: ClassificationMetrics
    intervals: ClassificationIntervals
    gates: GateReport

    def metrics_doc(self) -> dict[str, Any]:
        """``metrics.json``: the metrics with their intervals."""
        return {**self.metrics.to_dict(), "intervals": self.intervals.to_dict()}


def score_crops(logits: np.ndarray, y: np.ndarray, classes: Sequence[str], good_class: str, units: Sequence[str],
                gates: GateConfig, *, champion: ClassificationMetrics | None = None,
                board: Mapping[str, Any] | None = None) -> Scored:
    """Score ``logits`` ``(N, C)`` against labels ``y`` ``(N,)``: metrics, the gates of ``gates`` (against the
    champion's metrics and with the board-level test scores ``board``, when given) and intervals at
    ``gates.confidence``, macro recall bootstrapped over ``units`` (one resampling unit per crop)."""
    probs = softmax(logits)
    metrics = classification_metrics(y, probs, tuple(classes), good_class)
    report = evaluate_gates(metrics, gates, champion=champion, board=board)
    intervals = metrics_intervals(metrics, y, probs.argmax(1), units, gates.confidence)
    return Scored(probs, metrics, intervals, report)
