"""Triton model repository: ``<model>/config.pbtxt`` + ``<model>/<version>/model.onnx`` + ``<model>/labels.txt``.

The config declares ``platform: "onnxruntime_onnx"``, ``max_batch_size``, dynamic batching (preferred batch sizes and
the longest a request may wait for others), instance groups (``KIND_CPU`` or ``KIND_GPU``), a version policy (the
newest ``keep_versions`` versions are served) and the output's ``label_filename``. It also carries, as
``parameters``, the ``defectops.*`` metadata of the exported ONNX file (classes, input size, fit mode, task, run
id...): a client reads them from the model's config endpoint to preprocess exactly as the model expects.

:func:`write_repository` assembles one model folder locally (in a temporary folder renamed into place).
:func:`publish_repository` copies a local repository to the folder or ``s3://bucket/prefix`` that Triton polls, in
an order that never shows Triton a half-published model: every version folder first (the model file last inside
it), then ``labels.txt``, then ``config.pbtxt``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectops.core.fsutil import atomic_dir, atomic_path
from defectops.serving.config import TritonConfig
from defectops.serving.onnx_export import ANOMALY_OUTPUTS, INPUT_NAME, OUTPUT_NAME, read_metadata

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
PARAM_PREFIX = "defectops."
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class PublishError(RuntimeError):
    """A repository could not be published (bad source, unwritable destination, S3 failure)."""


def _pbtxt_str(value: str) -> str:
    """A protobuf text-format string literal."""
    if any(ord(ch) < 0x20 for ch in value):
        raise ValueError(f"{value!r} contains a control character: it cannot go into config.pbtxt")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"Triton model name {name!r} must be 1-128 letters, digits, '_', '.', '-' (not starting "
                         f"with '.', '_' or '-')")
    return name


def triton_config(model_name: str, input_shape: tuple[int, int, int], num_classes: int, cfg: TritonConfig,
                  keep_versions: int = 2, parameters: Mapping[str, str] | None = None,
                  outputs: Sequence[tuple[str, tuple[int, ...]]] | None = None) -> str:
    """The ``config.pbtxt`` text for an exported classifier (``parameters``: extra string parameters). ``outputs``
    replaces the classifier's one ``logits`` output (with its label file) by named outputs of the given per-sample
    dims (an anomaly model: ``scores`` (1,) and ``anomaly_map`` (1, H, W))."""
    check_model_name(model_name)
    if cfg.max_batch_size < 1:
        raise ValueError(f"export.triton.max_batch_size={cfg.max_batch_size}: dynamic batching needs at least 1")
    if cfg.instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"export.triton.instance_kind={cfg.instance_kind!r}: use one of {', '.join(INSTANCE_KINDS)}")
    if cfg.instances < 1:
        raise ValueError(f"export.triton.instances={cfg.instances}: at least 1 instance is needed")
    if cfg.max_queue_delay_us < 0:
        raise ValueError(f"export.triton.max_queue_delay_us={cfg.max_queue_delay_us} must not be negative")
    if keep_versions < 1 or num_classes < 1:
        raise ValueError(f"keep_versions={keep_versions} and num_classes={num_classes} must be at least 1")
    c, h, w = input_shape
    preferred = sorted({int(b) for b in cfg.preferred_batch_sizes if 1 <= int(b) <= cfg.max_batch_size})
    preferred_line = f"\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""
    if outputs is None:
        output_text = (f'  {{\n    name: "{OUTPUT_NAME}"\n    data_type: TYPE_FP32\n    dims: [ {num_classes} ]\n'
                       f'    label_filename: "{LABELS_FILE}"\n  }}')
    else:
        output_text = ",\n".join(f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n'
                                  f'    dims: [ {", ".join(map(str, dims))} ]\n  }}' for name, dims in outputs)
    params = "".join(f"parameters {{\n  key: {_pbtxt_str(k)}\n  value: {{ string_value: {_pbtxt_str(v)} }}\n}}\n"
                     for k, v in sorted((parameters or {}).items()))
    return f'''name: {_pbtxt_str(model_name)}
platform: "onnxruntime_onnx"
max_batch_size: {cfg.max_batch_size}
default_model_filename: "{MODEL_FILE}"
version_policy: {{ latest {{ num_versions: {keep_versions} }} }}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {c}, {h}, {w} ]
  }}
]
output [
{output_text}
]
dynamic_batching {{{preferred_line}
  max_queue_delay_microseconds: {cfg.max_queue_delay_us}
}}
instance_group [
  {{
    count: {cfg.instances}
    kind: {cfg.instance_kind}
  }}
]
{params}'''


def onnx_parameters(onnx_path: Path) -> dict[str, str]:
    """The ``defectops.*`` metadata of an exported ONNX file, as Triton config parameters."""
    return {k: v for k, v in read_metadata(onnx_path).items() if k.startswith(PARAM_PREFIX)}


def write_repository(repo_root: Path, model_name: str, onnx_path: Path, labels: Sequence[str],
                     input_shape: tuple[int, int, int], cfg: TritonConfig, version: int = 1,
                     parameters: Mapping[str, str] | None = None, keep_versions: int = 2,
                     outputs: Sequence[tuple[str, tuple[int, ...]]] | None = None) -> Path:
    """Create or replace ``repo_root/model_name`` with one version of the model; returns the model folder.

    Other versions already in the folder are kept. ``parameters`` defaults to the ONNX file's ``defectops.*``
    metadata.
    """
    if version < 1:
        raise ValueError(f"model version {version} must be a positive integer")
    if not labels or any(not str(lab) or "\n" in str(lab) or "\r" in str(lab) for lab in labels):
        raise ValueError(f"labels {list(labels)!r} must be non-empty single-line strings")
    params = onnx_parameters(Path(onnx_path)) if parameters is None else dict(parameters)
    if outputs is None and params.get(PARAM_PREFIX + "task") == "anomaly":  # raw scores and map, no labels
        _, h, w = input_shape
        outputs = ((ANOMALY_OUTPUTS[0], (1,)), (ANOMALY_OUTPUTS[1], (1, h, w)))
    text = triton_config(model_name, input_shape, len(labels), cfg, keep_versions=keep_versions, parameters=params,
                         outputs=outputs)
    dest = Path(repo_root) / model_name
    with atomic_dir(dest) as tmp:
        if dest.exists():  # keep other versions already written
            for child in dest.iterdir():
                if child.is_dir() and child.name.isdigit() and child.name != str(version):
                    shutil.copytree(child, tmp / child.name)
        (tmp / str(version)).mkdir()
        shutil.copy2(onnx_path, tmp / str(version) / MODEL_FILE)
        (tmp / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
    return dest


def onnx_input_shape(onnx_path: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of the first input of an ONNX classifier with a dynamic batch axis."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) for d in dims[1:])
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{onnx_path}: input {proto.graph.input[0].name!r} is not (batch, C, H, W) with fixed C, H, W")
    return shape[0], shape[1], shape[2]


# ------------------------------------------------------------------------------------------------------ publishing


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: the destination, the models and their versions, files uploaded and skipped (unchanged)."""

    dest: str
    models: dict[str, list[int]]
    uploaded: int
    skipped: int


def _model_dirs(local_repo: Path) -> list[Path]:
    local_repo = Path(local_repo)
    if not local_repo.is_dir():
        raise PublishError(f"Triton repository {local_repo} not found: build it first (defectops serve publish, or "
                           f"the run's verify_export step)")
    models = sorted(p for p in local_repo.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if not models:
        raise PublishError(f"{local_repo} holds no model folder with a {CONFIG_FILE}: is it a Triton repository root?")
    for m in models:
        check_model_name(m.name)
        if not _versions(m):
            raise PublishError(f"model folder {m} has no numbered version folder")
    return models


def _versions(model_dir: Path) -> list[Path]:
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _version_files(version_dir: Path) -> list[Path]:
    """Every file of a version folder, the model file(s) last: a poller that sees the model sees all it needs."""
    files = [p for p in version_dir.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: (p.name == MODEL_FILE or p.suffix == ".onnx", str(p)))


def _top_files(model_dir: Path) -> list[Path]:
    """Files beside the version folders, ``config.pbtxt`` last."""
    files = [p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.name == CONFIG_FILE, p.name))


def publish_repository(local_repo: Path, dest: str, *, client: Any = None,
                       progress: Callable[[str], None] | None = None) -> PublishResult:
    """Publish every model of the local repository ``local_repo`` to ``dest``: a folder or ``s3://bucket/prefix``.

    Versions already at ``dest`` and not in ``local_repo`` are kept (the version policy decides which are served).
    Order: each version folder (model file last), then ``labels.txt``, then ``config.pbtxt``, so a Triton polling
    ``dest`` never loads a model whose files are still arriving. Locally, a new model folder is assembled in a
    temporary sibling and renamed into place; into an existing one each version folder is renamed in whole and each
    top-level file replaced atomically. ``client``: an S3 client (default: :func:`training.remote.s3_client`).
    """
    models = _model_dirs(Path(local_repo))
    if dest.startswith("s3://"):
        return _publish_s3(models, dest, client, progress)
    if "://" in dest:
        raise PublishError(f"--to {dest!r}: publish to a local folder or s3://bucket/prefix")
    return _publish_local(models, Path(dest).expanduser(), progress)


def _same_file(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    from defectops.core.fsutil import sha256_file

    return sha256_file(a) == sha256_file(b)


def _publish_local(models: list[Path], dest: Path, progress: Callable[[str], None] | None) -> PublishResult:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PublishError(f"cannot create the repository folder {dest}: {e.strerror}") from None
    uploaded = skipped = 0
    published: dict[str, list[int]] = {}
    for m in models:
        target = dest / m.name
        versions = _versions(m)
        published[m.name] = [int(v.name) for v in versions]
        if not target.exists():  # a new model: assemble it whole, then one rename
            with atomic_dir(target) as tmp:
                for v in versions:
                    shutil.copytree(v, tmp / v.name)
                for f in _top_files(m):
                    shutil.copy2(f, tmp / f.name)
            uploaded += sum(1 for p in target.rglob("*") if p.is_file())
            if progress:
                progress(f"{target} (new)")
            continue
        for v in versions:
            vt = target / v.name
            files = _version_files(v)
            if vt.is_dir() and all(_same_file(f, vt / f.relative_to(v)) for f in files) and \
                    sum(1 for p in vt.rglob("*") if p.is_file()) == len(files):
                skipped += len(files)
                continue
            with atomic_dir(vt) as tmp:  # replacing a published version: a brief gap for that version only
                shutil.copytree(v, tmp, dirs_exist_ok=True)
            uploaded += len(files)
            if progress:
                progress(str(vt))
        for f in _top_files(m):
            if _same_file(f, target / f.name):
                skipped += 1
                continue
            with atomic_path(target / f.name) as tmp_file:
                shutil.copyfile(f, tmp_file)
            uploaded += 1
            if progress:
                progress(str(target / f.name))
    return PublishResult(str(dest), published, uploaded, skipped)


def _publish_s3(models: list[Path], dest: str, client: Any, progress: Callable[[str], None] | None) -> PublishResult:
    from defectops.training.remote import (
        MAX_PUT_BYTES,
        RemoteError,
        _check_bucket,
        _digests,
        _not_found,
        _put,
        _s3_errors,
        parse_s3_uri,
        s3_client,
    )

    try:
        bucket, prefix = parse_s3_uri(dest)
    except ValueError as e:
        raise PublishError(str(e)) from None
    c = client if client is not None else s3_client()
    uploaded = skipped = 0
    published: dict[str, list[int]] = {}

    def upload(path: Path, key: str) -> None:
        nonlocal uploaded, skipped
        sha_hex, md5, size = _digests(path)
        if size > MAX_PUT_BYTES:
            raise PublishError(f"{path} is {size} bytes: over S3's single-PUT limit of {MAX_PUT_BYTES}")
        with _s3_errors(c, bucket, key):
            try:
                head = c.head_object(Bucket=bucket, Key=key)
            except Exception as e:
                if not _not_found(e):
                    raise
                head = None
        # a single-part upload's ETag is its MD5: this exact file is there already
        if head is not None and int(head.get("ContentLength", -1)) == size and \
                str(head.get("ETag", "")).strip('"') == md5.hex():
            skipped += 1
            return
        with open(path, "rb") as body:
            _put(c, bucket, key, body, size=size, md5=md5, sha256=bytes.fromhex(sha_hex),
                 content_type="text/plain" if path.suffix in (".pbtxt", ".txt") else "application/octet-stream")
        uploaded += 1
        if progress:
            progress(f"s3://{bucket}/{key}")

    def key_of(*parts: str) -> str:
        return "/".join(p for p in (prefix, *parts) if p)

    try:
        _check_bucket(c, bucket)
        for m in models:
            versions = _versions(m)
            published[m.name] = [int(v.name) for v in versions]
            for v in versions:
                for f in _version_files(v):
                    upload(f, key_of(m.name, v.name, f.relative_to(v).as_posix()))
            for f in _top_files(m):
                upload(f, key_of(m.name, f.name))
    except RemoteError as e:
        raise PublishError(str(e)) from None
    return PublishResult(dest.rstrip("/"), published, uploaded, skipped)


def read_config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """``{key: string_value}`` of a model config's ``parameters`` (as Triton's config endpoint returns them)."""
    out = {}
    for k, v in (config.get("parameters") or {}).items():
        out[k] = v.get("string_value", "") if isinstance(v, Mapping) else str(v)
    return out


def classes_from_parameters(params: Mapping[str, str]) -> list[str] | None:
    raw = params.get(PARAM_PREFIX + "classes")
    if not raw:
        return None
    try:
        classes = json.loads(raw)
    except ValueError:
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None
