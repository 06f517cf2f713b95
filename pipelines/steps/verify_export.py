"""``verify_export``: the configured task re-evaluates the exported model through onnxruntime (parity with PyTorch
and the same gates, board-level too), decides whether the INT8 copy may be published, tags the model version with the
verdicts and writes the Triton model repository (:meth:`pipelines.tasks.base.Task.verify_export`). A failure removes
the ``challenger`` alias.

Reads: ``RUN.crops``, ``RUN.predictions``, ``RUN.onnx``, ``RUN.onnx_int8``, ``RUN.detector``, ``RUN.metrics``,
``RUN.champion_metrics``, ``RUN.registration``, ``RUN.snapshot``, ``RUN.validation``. Writes: ``RUN.parity``,
``RUN.onnx_metrics``, ``RUN.onnx_gates``, ``RUN.onnx_board_metrics``, ``RUN.int8_report``, ``RUN.triton``.
"""

from __future__ import annotations

from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.evaluation.gates import GateConfig
from defectops.pipelines.context import StepContext
from defectops.pipelines.results import VerifyExportResult
from defectops.pipelines.tasks import create_task
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.training.config import AnomalyConfig, DataConfig

READS = (RUN.crops, RUN.predictions, RUN.onnx, RUN.onnx_int8, RUN.detector, RUN.metrics, RUN.champion_metrics,
         RUN.registration, RUN.snapshot, RUN.validation, RUN.anomaly)
WRITES = (RUN.parity, RUN.onnx_metrics, RUN.onnx_gates, RUN.onnx_board_metrics, RUN.int8_report, RUN.triton)


def verify_export(ctx: StepContext, data: DataConfig, export: ExportConfig, gates: GateConfig,
                  registry: RegistryConfig, detect: DetectConfig, task: TaskKind,
                  anomaly: AnomalyConfig) -> VerifyExportResult:
    """Re-evaluate the ONNX model through onnxruntime: parity with PyTorch and the same gates; then publish it as a
    Triton model repository. A failure removes the challenger alias."""
    return create_task(task, anomaly=anomaly).verify_export(ctx, data, export, gates, registry, detect)
