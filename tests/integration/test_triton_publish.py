"""Triton repository publishing: config.pbtxt contents, local folders, S3 (a real SeaweedFS), and ``serve publish``.

The last test has the real ``tritonserver`` load the repository straight from S3, as the Helm chart's Triton does
(its ``onnxruntime`` backend being the test-only Python stand-in of tests/triton_backend/onnxruntime/model.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3server import SeaweedS3
from tiny import TinyRun
from triton_backend.server import triton_server
from typer.testing import CliRunner

from defectops.pipelines.cli import EXIT_FAILURE, EXIT_USAGE, app
from defectops.serving.config import TritonConfig
from defectops.serving.model_ref import from_onnx
from defectops.serving.onnx_export import onnx_logits, onnx_session
from defectops.serving.triton import (
    PublishError,
    onnx_input_shape,
    publish_repository,
    read_config_parameters,
    triton_config,
    write_repository,
)
from defectops.training.remote import s3_client

MODEL = "defectops-aoi"
BUCKET = "triton-models"


def _onnx(tiny_run: TinyRun) -> Path:
    return Path(tiny_run.root) / "export" / "model.onnx"


def _build(tiny_run: TinyRun, root: Path, version: int = 1, cfg: TritonConfig | None = None) -> Path:
    m = from_onnx(_onnx(tiny_run))
    write_repository(root, MODEL, m.onnx_path, m.classes, onnx_input_shape(m.onnx_path), cfg or TritonConfig(),
                     version=version)
    return root


def test_triton_config_declares_batching_instances_labels_and_versions() -> None:
    cfg = TritonConfig(max_batch_size=16, preferred_batch_sizes=[4, 8, 32], max_queue_delay_us=250, instances=2,
                       instance_kind="KIND_GPU")
    text = triton_config("m", (3, 64, 64), 7, cfg, keep_versions=3,
                         parameters={"defectops.classes": json.dumps(["a \"b\"", "c\\d"])})
    for line in ('name: "m"', 'platform: "onnxruntime_onnx"', "max_batch_size: 16", "preferred_batch_size: [ 4, 8 ]",
                 "max_queue_delay_microseconds: 250", "count: 2", "kind: KIND_GPU", "dims: [ 3, 64, 64 ]",
                 "dims: [ 7 ]", 'label_filename: "labels.txt"', "latest { num_versions: 3 }",
                 'default_model_filename: "model.onnx"',
                 r'string_value: "[\"a \\\"b\\\"\", \"c\\\\d\"]"'):
        assert line in text, line
    assert "KIND_CPU" in triton_config("m", (3, 8, 8), 2, TritonConfig())
    for bad, words in (({"instance_kind": "KIND_TPU"}, "KIND_CPU, KIND_GPU"), ({"max_batch_size": 0}, "at least 1"),
                       ({"instances": 0}, "at least 1 instance")):
        with pytest.raises(ValueError, match=words):
            triton_config("m", (3, 8, 8), 2, dataclasses.replace(TritonConfig(), **bad))
    with pytest.raises(ValueError, match="Triton model name"):
        triton_config("a/b", (3, 8, 8), 2, TritonConfig())


def test_write_repository_carries_the_model_metadata_and_keeps_versions(tiny_run: TinyRun, tmp_path: Path) -> None:
    m = from_onnx(_onnx(tiny_run))
    _build(tiny_run, tmp_path, 1)
    _build(tiny_run, tmp_path, 2)
    model_dir = tmp_path / MODEL
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert (model_dir / "labels.txt").read_text().splitlines() == list(m.classes)
    text = (model_dir / "config.pbtxt").read_text()
    for key in ("classes", "fit_mode", "input_size", "good_class", "task"):
        assert f'key: "defectops.{key}"' in text
    assert onnx_input_shape(m.onnx_path) == (3, m.input_size, m.input_size)
    assert read_config_parameters({"parameters": {"k": {"string_value": "v"}}}) == {"k": "v"}


def test_publish_to_a_local_folder(tiny_run: TinyRun, tmp_path: Path) -> None:
    src = _build(tiny_run, tmp_path / "build", 1)
    dest = tmp_path / "served"
    r = publish_repository(src, str(dest))
    assert (r.models, r.uploaded, r.skipped) == ({MODEL: [1]}, 3, 0)
    assert (dest / MODEL / "1" / "model.onnx").read_bytes() == _onnx(tiny_run).read_bytes()
    again = publish_repository(src, str(dest))
    assert (again.uploaded, again.skipped) == (0, 3)  # nothing changed, nothing rewritten
    src2 = _build(tiny_run, tmp_path / "build2", 2, TritonConfig(max_queue_delay_us=900))
    r2 = publish_repository(src2, str(dest))
    assert r2.models == {MODEL: [2]}
    assert sorted(p.name for p in (dest / MODEL).iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]  # v1 kept
    assert "max_queue_delay_microseconds: 900" in (dest / MODEL / "config.pbtxt").read_text()
    assert not list(dest.rglob(".*"))  # no temporary leftovers
    with pytest.raises(PublishError, match="holds no model folder"):
        publish_repository(tmp_path / "served" / MODEL / "1", str(tmp_path / "x"))
    with pytest.raises(PublishError, match="s3://bucket/prefix"):
        publish_repository(src, "gs://bucket/x")


class _Recorder:
    """Wraps an S3 client and records the keys it PUTs, in order."""

    def __init__(self, client: Any) -> None:
        self.client, self.puts = client, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def put_object(self, **kw: Any) -> Any:
        self.puts.append(kw["Key"])
        return self.client.put_object(**kw)


def _client(s3: SeaweedS3) -> Any:
    return s3_client(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key)


def test_publish_to_s3_uploads_versions_first_and_config_last(tiny_run: TinyRun, s3: SeaweedS3, tmp_path: Path) -> None:
    c = _client(s3)
    if BUCKET not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
        c.create_bucket(Bucket=BUCKET)
    src = _build(tiny_run, tmp_path / "build", 1)
    _build(tiny_run, src, 2)
    rec = _Recorder(c)
    r = publish_repository(src, f"s3://{BUCKET}/order/models", client=rec)
    assert (r.uploaded, r.skipped) == (4, 0)
    assert rec.puts == [f"order/models/{MODEL}/1/model.onnx", f"order/models/{MODEL}/2/model.onnx",
                        f"order/models/{MODEL}/labels.txt", f"order/models/{MODEL}/config.pbtxt"]
    for key, local in ((f"order/models/{MODEL}/2/model.onnx", src / MODEL / "2" / "model.onnx"),
                       (f"order/models/{MODEL}/config.pbtxt", src / MODEL / "config.pbtxt")):
        assert c.get_object(Bucket=BUCKET, Key=key)["Body"].read() == local.read_bytes()
    again = publish_repository(src, f"s3://{BUCKET}/order/models", client=_Recorder(c))
    assert (again.uploaded, again.skipped) == (0, 4)  # same bytes (ETag = MD5): nothing re-sent
    with pytest.raises(PublishError, match="does not exist"):
        publish_repository(src, "s3://no-such-bucket/x", client=c)


def test_serve_publish_cli_to_s3_then_triton_serves_it_from_s3(tiny_run: TinyRun, s3: SeaweedS3, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    c = _client(s3)
    if BUCKET not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
        c.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("DEFECTOPS_HOME", str(tiny_run.home))
    aws = {"AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": s3.region}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "publish", "--model", f"models:/{MODEL}@challenger", "--to",
                            f"s3://{BUCKET}/cli", "--kind", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"published {MODEL} version 1" in r.output
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix="cli/")["Contents"])
    assert keys == [f"cli/{MODEL}/1/model.onnx", f"cli/{MODEL}/config.pbtxt", f"cli/{MODEL}/labels.txt"]
    r = runner.invoke(app, ["serve", "publish", "--model", str(_onnx(tiny_run)), "--to", str(tmp_path / "x")])
    assert r.exit_code == EXIT_USAGE and "--name" in r.output
    r = runner.invoke(app, ["serve", "publish", "--model", str(tiny_run.root), "--to", "s3://no-such-bucket/x"])
    assert r.exit_code == EXIT_FAILURE and "no-such-bucket does not exist" in r.output
    r = runner.invoke(app, ["serve", "publish", "--model", str(tiny_run.root), "--to", "s3://b/x", "--kind", "tpu"])
    assert r.exit_code == EXIT_USAGE

    # Triton reads the published repository straight from S3 (its own S3 client, path-style, SigV4)
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
           "AWS_DEFAULT_REGION": s3.region}
    host = s3.endpoint.removeprefix("http://")
    from defectops.serving.client import TritonClient

    with triton_server(f"s3://http://{host}/{BUCKET}/cli", tmp_path / "server", env=env) as server, \
            TritonClient(server.http_url, MODEL) as client:
        m = from_onnx(_onnx(tiny_run))
        x = np.random.default_rng(0).random((4, 3, m.input_size, m.input_size), dtype=np.float32)
        assert client.labels == m.classes
        assert np.abs(client.classify(x).logits - onnx_logits(onnx_session(m.onnx_path), x)).max() < 1e-5
