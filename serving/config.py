"""Export and serving configuration (Hydra structured-config group ``export``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class InstanceKind(StrEnum):
    """Where Triton runs a model instance (``export.triton.instance_kind``)."""

    KIND_CPU = "KIND_CPU"
    KIND_GPU = "KIND_GPU"


class CalibrationMethod(StrEnum):
    """How INT8 activation ranges are calibrated (``export.int8.method``)."""

    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Serve(StrEnum):
    """Which verified export the Triton repository serves (``export.serve``)."""

    fp32 = "fp32"
    int8 = "int8"


class DetectSelect(StrEnum):
    """The val score the detector's thresholds maximise (``detect.select``)."""

    mean = "mean"
    fscore = "fscore"
    map = "map"


class Confidence(StrEnum):
    """What a detection's confidence is (``detect.confidence``)."""

    label = "label"
    defect = "defect"


@dataclass
class TritonConfig:
    max_batch_size: int = 64
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 32])
    max_queue_delay_us: int = 500
    instances: int = 1
    instance_kind: InstanceKind = InstanceKind.KIND_CPU


@dataclass
class Int8Config:
    """INT8 post-training quantization (onnxruntime static, QDQ), re-evaluated before it may be served.

    ``calibration_samples`` training crops, stratified by class, calibrate the activation ranges (``method``:
    minmax | entropy | percentile); weights are quantized per output channel when ``per_channel``. The INT8 model must
    pass the checkpoint's gates and lose at most ``max_macro_recall_drop`` macro recall (0.005 = half a point).
    """

    enabled: bool = True
    calibration_samples: int = 256
    method: CalibrationMethod = CalibrationMethod.minmax
    per_channel: bool = True
    max_macro_recall_drop: float = 0.005


@dataclass
class ExportConfig:
    """ONNX export and the parity required between the checkpoint and the exported model.

    ``serve`` picks the artifact the Triton repository gets: ``fp32``, or ``int8`` when the INT8 model was verified
    (else FP32, with the reason logged).
    """

    opset: int = 17
    min_top1_agreement: float = 0.999
    max_logit_diff: float = 1e-3
    serve: Serve = Serve.fp32
    int8: Int8Config = field(default_factory=Int8Config)
    triton: TritonConfig = field(default_factory=TritonConfig)


@dataclass
class DetectConfig:
    """Board-level detection on DeepPCB-format data: candidates + classifier -> boxes scored with the DeepPCB metric.

    ``score_threshold`` null: chosen on the validation split to maximise ``select`` (the DeepPCB F-score, mAP or
    their mean), then applied unchanged to the test split (and embedded in the exported model); with
    ``threshold_per_type`` each defect type then gets its own threshold, chosen the same way. A candidate becomes a
    detection when its defect probability ``1 - p(good)`` reaches the threshold; ``confidence`` is what its result
    line reports and the mAP ranks by: ``label`` (the reported type's probability) or ``defect`` (``1 - p(good)``).
    """

    enabled: bool = True
    score_threshold: float | None = None
    select: DetectSelect = DetectSelect.mean
    threshold_per_type: bool = False
    merge: bool = True
    confidence: Confidence = Confidence.label
    iou_threshold: float = 0.33
    threads: int = 2
    batch_boards: int = 8
