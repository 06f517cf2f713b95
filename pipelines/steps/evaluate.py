"""``evaluate``: the configured task scores the trained model on the test split (boards too, for candidate
verification), compares it with the champion, applies the gates, and writes the metrics, the gate table, the review
evidence and the HTML report (:meth:`pipelines.tasks.base.Task.evaluate`).

Reads: ``RUN.crops``, ``RUN.model``, ``RUN.snapshot``, ``RUN.validation``, ``RUN.shortcut``. Writes: ``RUN.metrics``,
``RUN.gates``, ``RUN.predictions``, ``RUN.report``, ``RUN.misses``, and with boards ``RUN.board_metrics`` and
``RUN.detector``; ``RUN.champion_metrics`` when a champion was scored.
"""

from __future__ import annotations

from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.evaluation.gates import GateConfig
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import EvaluateResult
from defectops.pipelines.tasks import create_task
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig
from defectops.training.config import AnomalyConfig, DataConfig

READS = (RUN.crops, RUN.model, RUN.snapshot, RUN.validation, RUN.shortcut)
WRITES = (RUN.metrics, RUN.gates, RUN.predictions, RUN.report, RUN.misses, RUN.board_metrics, RUN.detector,
          RUN.champion_metrics, RUN.anomaly)


def evaluate(ctx: StepContext, data: DataConfig, gates: GateConfig, registry: RegistryConfig,
             detect: DetectConfig, task: TaskKind, anomaly: AnomalyConfig) -> EvaluateResult:
    """Score the trained model on the test split (and the task's own evaluation: boards), apply the gates, write
    metrics and the HTML report."""
    if not 0.0 < gates.confidence < 1.0:
        raise StepError(f"gates.confidence={gates.confidence} must lie strictly between 0 and 1: use e.g. 0.95")
    return create_task(task, anomaly=anomaly).evaluate(ctx, data, gates, registry, detect)
