"""Export a crop classifier to ONNX (dynamic batch) and run it through onnxruntime.

Input ``images``: float32 (N, C, H, W) in [0, 1]; output ``logits``: float32 (N, num_classes). The graph includes the
model's normalisation, so every runtime preprocesses the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from defectops.core.fsutil import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ANOMALY_OUTPUTS = ("scores", "anomaly_map")  # an anomaly model's raw image scores (N, 1) and maps (N, 1, H, W)


def export_onnx(model: nn.Module, path: Path, *, input_shape: tuple[int, int, int], opset: int = 17,
                metadata: Mapping[str, str] | None = None, output_names: Sequence[str] = (OUTPUT_NAME,)) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis, checked by ``onnx.checker`` before it becomes visible.
    ``output_names`` names the model's outputs (a crop classifier: ``logits``; an anomaly model: its score and map).

    ``metadata`` goes into the model's ``metadata_props``: DefectOps stores there what a consumer needs to use the
    file alone (classes, input size, preprocessing, candidate and detector settings).
    """
    model = model.eval().cpu()
    dummy = torch.zeros((2, *input_shape), dtype=torch.float32)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
        torch.onnx.export(model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=list(output_names),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading its weights into a session)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def onnx_session(path: Path, threads: int = 0, *, spinning: bool = True) -> ort.InferenceSession:
    """A CPU session; ``spinning=False`` lets idle intra-op threads sleep instead of busy-waiting, which frees the
    cores for work beside the model (the board detector's decoding and candidate threads: +10-15 % boards/s on two
    cores, ``docs/deeppcb.md``)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for float32 (N, C, H, W) images in [0, 1]."""
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch_size], np.float32)})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Parity:
    """Agreement of two runtimes on the same inputs."""

    n: int
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Compare logits (N, C) of the reference runtime with a candidate's; pure."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    if len(reference) == 0:
        raise ValueError("parity needs at least one sample")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return Parity(len(reference), agree, float(diff.max()), float(diff.mean()))
