"""INT8 post-training quantization of an exported classifier, and the check that decides whether it may be served.

What: :func:`quantize_int8` turns the FP32 ONNX export into an INT8 one with onnxruntime's static quantization (QDQ
format, signed INT8 weights per output channel, unsigned INT8 activations calibrated on a class-stratified sample of
training crops), keeping the model's DefectOps metadata. :func:`int8_verdict` (pure) compares the INT8 model's
metrics with the checkpoint's and says whether the artifact may be published.

Why: on CPU an INT8 model runs several times faster, but INT8 exports are also where detection and anomaly toolkits'
users most often see a model silently collapse (a saturated activation range, a depthwise layer quantized per
tensor). DefectOps therefore never publishes an INT8 artifact it has not re-evaluated: it must pass the same gates as
the checkpoint and lose at most ``max_macro_recall_drop`` of macro recall; otherwise it is refused with the reason.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from defectops.core.fsutil import atomic_path
from defectops.serving.onnx_export import INPUT_NAME

__all__ = ["CALIBRATION_METHODS", "Int8Verdict", "calibration_sample", "int8_verdict", "quantize_int8"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def calibration_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``n`` samples, stratified by class (every class gets its share, at least one sample when it
    has any), in a seeded random order; pure. Rare defect classes are what a plain random sample would miss, and
    their activations are what a too-narrow calibrated range clips."""
    labels = np.asarray(labels)
    if n <= 0 or len(labels) == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = np.maximum(1, np.floor(counts / counts.sum() * n)).astype(int)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, share, strict=True)]
    out = rng.permutation(np.concatenate(picked))[:n]
    return np.sort(out).astype(np.int64)


class _Reader:
    """onnxruntime CalibrationDataReader over float32 NCHW batches."""

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        self.images = np.ascontiguousarray(images, np.float32)
        self.batch_size = batch_size
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        batch = self.images[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, per_channel: bool = True,
                  method: str = "minmax", batch_size: int = 32, extra_metadata: dict[str, str] | None = None,
                  op_types: Sequence[str] | None = None, exclude_nodes: Sequence[str] | None = None) -> Path:
    """Write the INT8 (QDQ) version of ``fp32_path`` to ``out_path`` (atomically), calibrated on ``calibration``
    (float32 N x C x H x W in [0, 1], as the FP32 model takes them). The FP32 model's ``metadata_props`` are kept and
    ``extra_metadata`` added.

    ``op_types`` (e.g. ``["Conv"]``) quantizes only nodes of those types and ``exclude_nodes`` (node names) leaves
    those nodes in FP32; both None (the classifiers' export) quantizes every operator onnxruntime can. An anomaly model
    quantizes its backbone's convolutions only: its nearest-neighbour distances and minimum stay FP32
    (:meth:`pipelines.tasks.anomaly.AnomalyTask.export`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    if len(calibration) == 0:
        raise ValueError("INT8 calibration needs at least one sample")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    fp32 = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(prefix="defectops-int8-") as work, atomic_path(out_path) as tmp:
        pre = Path(work) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        raw = Path(work) / "int8.onnx"
        quantize_static(str(pre), str(raw), _Reader(calibration, batch_size), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate,
                        op_types_to_quantize=list(op_types) if op_types is not None else None,
                        nodes_to_exclude=list(exclude_nodes) if exclude_nodes is not None else None)
        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        for p in fp32.metadata_props:
            proto.metadata_props.add(key=p.key, value=p.value)
        for key, value in (extra_metadata or {}).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out_path


@dataclass(frozen=True)
class Int8Verdict:
    """Whether an INT8 artifact may be published, and why not."""

    publish: bool
    macro_recall_drop: float
    max_macro_recall_drop: float
    top1_agreement: float
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def int8_verdict(reference_macro_recall: float, int8_macro_recall: float, top1_agreement: float,
                 failed_gates: Sequence[str], max_macro_recall_drop: float) -> Int8Verdict:
    """Pure: the INT8 artifact is published only if it passes every gate the checkpoint is held to and loses at most
    ``max_macro_recall_drop`` (a fraction: 0.005 is half a point) of the checkpoint's macro recall."""
    drop = float(reference_macro_recall - int8_macro_recall)
    reasons = [f"gate {g} failed" for g in failed_gates]
    if not np.isfinite(drop) or drop > max_macro_recall_drop:
        reasons.append(f"macro recall drops by {100 * drop:.2f} points (checkpoint {reference_macro_recall:.4f}, "
                       f"INT8 {int8_macro_recall:.4f}), more than export.int8.max_macro_recall_drop = "
                       f"{100 * max_macro_recall_drop:.2f} points")
    return Int8Verdict(not reasons, drop, max_macro_recall_drop, float(top1_agreement), tuple(reasons))
