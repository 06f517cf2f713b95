"""``export``: the configured task's model as ONNX (dynamic batch axis) carrying what serving needs (classes, input
size, detector settings), and with ``export.int8.enabled`` an INT8 copy (:meth:`pipelines.tasks.base.Task.export`).

Reads: ``RUN.model``, ``RUN.detector``, ``RUN.crops``, ``RUN.snapshot``. Writes: ``RUN.onnx``, ``RUN.onnx_int8``.
"""

from __future__ import annotations

from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.pipelines.context import StepContext
from defectops.pipelines.results import ExportResult
from defectops.pipelines.tasks import create_task
from defectops.serving.config import ExportConfig
from defectops.training.config import AnomalyConfig, DataConfig

READS = (RUN.model, RUN.detector, RUN.crops, RUN.snapshot, RUN.anomaly)
WRITES = (RUN.onnx, RUN.onnx_int8)


def export(ctx: StepContext, export: ExportConfig, data: DataConfig, task: TaskKind,
           anomaly: AnomalyConfig) -> ExportResult:
    """Export the trained model to ONNX (dynamic batch) carrying its classes, input size and detector settings."""
    return create_task(task, anomaly=anomaly).export(ctx, export, data)
