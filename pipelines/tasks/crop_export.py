"""A crop classifier's export (:meth:`CropClassifierTask.export`): the trained model as ONNX (dynamic batch axis)
carrying its classes, input size and the task's extras (detector settings), and with ``export.int8.enabled`` an INT8
copy calibrated on a class-stratified sample of the training crops.
"""

from __future__ import annotations

import json
from typing import Any

from defectops.core.fsutil import read_json
from defectops.core.layout import RUN
from defectops.pipelines.context import StepContext
from defectops.pipelines.results import ExportResult
from defectops.serving.config import ExportConfig
from defectops.training.config import DataConfig
from defectops.training.snapshot import load_snapshot


def export_crop_classifier(model_task: str, extra: dict[str, Any], ctx: StepContext, export: ExportConfig,
                           data: DataConfig) -> ExportResult:
    """Export the trained model to ONNX (dynamic batch) carrying its classes, input size, ``model_task`` and the
    task's ``extra`` metadata (``candidates``, ``detector``)."""
    from defectops.serving.model_ref import model_metadata
    from defectops.serving.onnx_export import export_onnx
    from defectops.training.trainer import load_trained_model

    net, state = load_trained_model(ctx.path(RUN.model))
    size = int(state["img_size"])
    crops_meta = read_json(ctx.path(RUN.crops) / "snapshot.json")
    meta = model_metadata(list(state["classes"]), data.good_class, size, model_task, fit_mode=data.fit_mode,
                          candidates=extra.get("candidates"), detector=extra.get("detector") or {},
                          extra={"run_id": ctx.run_id, "dataset_fingerprint": crops_meta.get("board_fingerprint", "")})
    export_onnx(net, ctx.path(RUN.onnx), input_shape=(3, size, size), opset=export.opset, metadata=meta)
    return ExportResult(str(ctx.path(RUN.onnx)), export.opset, ctx.path(RUN.onnx).stat().st_size,
                        _export_int8(ctx, export) if export.int8.enabled else None)


def _export_int8(ctx: StepContext, export: ExportConfig) -> dict[str, Any]:
    """Quantize the FP32 export to INT8, calibrated on a class-stratified sample of the training crops."""
    from defectops.serving.quantize import calibration_sample, quantize_int8
    from defectops.training.data import load_split, to_tensor

    q = export.int8
    x, y, _ = load_split(load_snapshot(ctx.path(RUN.crops)), "train")
    idx = calibration_sample(y, q.calibration_samples, seed=0)
    calibration = {"samples": len(idx), "method": q.method, "per_channel": q.per_channel}
    quantize_int8(ctx.path(RUN.onnx), ctx.path(RUN.onnx_int8), to_tensor(x[idx]).numpy(), per_channel=q.per_channel,
                  method=q.method, extra_metadata={"defectops.precision": "int8",
                                                   "defectops.int8_calibration": json.dumps(calibration)})
    return {"path": str(ctx.path(RUN.onnx_int8)), "bytes": ctx.path(RUN.onnx_int8).stat().st_size, **calibration}
