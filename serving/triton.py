"""Triton model repository: ``<model>/config.pbtxt`` + ``<model>/<version>/model.onnx`` + ``<model>/labels.txt``.

The config declares ``platform: "onnxruntime_onnx"``, dynamic batching, instance groups and a version policy; the
repository is assembled in a temporary folder and renamed into place, so a half-written model is never served.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from pipelines.fsutil import atomic_dir
from serving.config import TritonConfig
from serving.onnx_export import INPUT_NAME, OUTPUT_NAME


def triton_config(model_name: str, input_shape: tuple[int, int, int], num_classes: int, cfg: TritonConfig,
                  keep_versions: int = 2) -> str:
    """The ``config.pbtxt`` text for an exported classifier."""
    c, h, w = input_shape
    preferred = ", ".join(str(b) for b in cfg.preferred_batch_sizes if b <= cfg.max_batch_size)
    return f'''name: "{model_name}"
platform: "onnxruntime_onnx"
max_batch_size: {cfg.max_batch_size}
version_policy: {{ latest {{ num_versions: {keep_versions} }} }}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {c}, {h}, {w} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {cfg.max_queue_delay_us}
}}
instance_group [
  {{
    count: {cfg.instances}
    kind: {cfg.instance_kind}
  }}
]
'''


def write_repository(repo_root: Path, model_name: str, onnx_path: Path, labels: Sequence[str],
                     input_shape: tuple[int, int, int], cfg: TritonConfig, version: int = 1) -> Path:
    """Create or replace ``repo_root/model_name`` with one version of the model; returns the model folder."""
    dest = Path(repo_root) / model_name
    with atomic_dir(dest) as tmp:
        if dest.exists():  # keep other versions already published
            for child in dest.iterdir():
                if child.is_dir() and child.name.isdigit() and child.name != str(version):
                    shutil.copytree(child, tmp / child.name)
        (tmp / str(version)).mkdir()
        shutil.copy2(onnx_path, tmp / str(version) / "model.onnx")
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        (tmp / "config.pbtxt").write_text(triton_config(model_name, input_shape, len(labels), cfg), encoding="utf-8")
    return dest
